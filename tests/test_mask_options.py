"""The study options of AIM's masks: mask_topdown_context, per_image_mask_loss, mask_saliency_prior and mask_budget."""
from collections import OrderedDict

import pytest
import torch

import aim
from aim.nn.backbones import SmallConvNet
from aim.nn.loss import per_image_mask_loss
from aim.config import TrainConfig
from aim.checkpoint import build_model
from aim_kernels import mask_loss

STAGE_CHANNELS = [4, 6, 8]


def stages(requires_grad=False):
    sizes = (9, 5, 3)  # odd sizes: the nearest upsampling is not a plain factor of 2
    return OrderedDict((f"s{i}", torch.randn(2, c, s, s, requires_grad=requires_grad))
                       for i, (c, s) in enumerate(zip(STAGE_CHANNELS, sizes)))


@pytest.mark.parametrize("context", [False, True])
def test_finer_masks_read_the_coarser_fused_map_only_with_the_option(context):
    torch.manual_seed(0)
    topdown = aim.FusedTopDownMask(STAGE_CHANNELS, 5, depth=3, mask_hidden_channels=4, initial_mask_logit=0.0,
                                   mask_topdown_context=context)
    extra = [5 if context else 0] * 2 + [0]  # the coarsest stage has no F_l+1
    assert [e.stem[0].in_channels for e in topdown.mask_estimators] == [c + x for c, x in zip(STAGE_CHANNELS, extra)]
    x = stages(requires_grad=True)
    masks = topdown.train().run(x).masks
    masks["s0"].sum().backward()  # the finest mask, through the straight-through gradient
    coarse_grad = x["s2"].grad
    reached = coarse_grad is not None and bool(coarse_grad.abs().sum() > 0)
    assert reached == context  # S_2 reaches B_0 through F_1 -> M_0 only with the option


def test_default_pathway_is_unchanged_by_the_option_default():
    torch.manual_seed(0)
    default = aim.FusedTopDownMask(STAGE_CHANNELS, 5, mask_hidden_channels=4).eval()
    explicit = aim.FusedTopDownMask(STAGE_CHANNELS, 5, mask_hidden_channels=4, mask_topdown_context=False).eval()
    explicit.load_state_dict(default.state_dict(), strict=True)
    x = stages()
    with torch.no_grad():
        for a, b in zip(default(x).values(), explicit(x).values()):
            assert torch.equal(a, b)


def test_sparse_eval_logits_equal_the_dense_path_with_topdown_context():
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet(), num_classes=3, out_channels=8, mask_hidden_channels=8, initial_mask_logit=0.0,
                    mask_topdown_context=True).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        sparse = model(images)
        model.topdown.sparse_eval = False
        dense = model(images)
    for name in dense.masks:
        assert torch.equal(sparse.masks[name], dense.masks[name])
    torch.testing.assert_close(sparse.logits, dense.logits)


def test_per_image_mask_loss_penalizes_each_images_fraction():
    # Image 0 all on, image 1 all off: the batch fraction is tau, each image is 0.5 off it.
    mask = torch.cat([torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)])
    assert float(mask_loss([mask], 0.5)) == 0.0
    assert float(per_image_mask_loss([mask], 0.5)) == pytest.approx(0.25)
    assert float(per_image_mask_loss([mask, mask[:, :, :2]], [0.5, 1.0])) == pytest.approx(0.25 + 0.5 * (0 + 1))
    mask.requires_grad_()
    per_image_mask_loss([mask], 0.5).backward()
    # d/dm of mean_i (r_i - tau)^2 = 2 (r_i - tau) / (N * H * W)
    assert torch.allclose(mask.grad[0], torch.full((1, 4, 4), 2 * 0.5 / 32))
    assert torch.allclose(mask.grad[1], torch.full((1, 4, 4), -2 * 0.5 / 32))
    same = torch.ones(3, 1, 4, 4)  # equal fractions: the two losses agree
    assert float(per_image_mask_loss([same], 0.25)) == pytest.approx(float(mask_loss([same], 0.25)))
    with pytest.raises(ValueError, match="tau"):
        per_image_mask_loss([mask], [0.5, 0.5])


def test_aim_loss_uses_the_per_image_term_by_default_and_the_batch_term_when_asked():
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet(), num_classes=2, out_channels=8, mask_hidden_channels=8, initial_mask_logit=0.0)
    out = model.train()(torch.rand(4, 3, 32, 32))
    labels = torch.tensor([0, 1, 0, 1])
    masks = list(out.masks.values())
    assert torch.allclose(aim.AIMLoss()(out, labels, 0.3).mask, per_image_mask_loss(masks, 0.3))
    assert torch.allclose(aim.AIMLoss(per_image_mask_loss=False)(out, labels, 0.3).mask, mask_loss(masks, 0.3))


def test_train_config_plumbs_the_topdown_context():
    assert build_model(TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8), 2).topdown.mask_topdown_context
    config = TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8, mask_topdown_context=False)
    assert not build_model(config, 2).topdown.mask_topdown_context


def test_saliency_is_each_images_standardized_log_energy():
    from aim.nn.topdown import saliency

    torch.manual_seed(0)
    stage = torch.randn(3, 6, 5, 7, requires_grad=True)
    z = saliency(stage)
    assert z.shape == (3, 1, 5, 7) and not z.requires_grad  # detached: the prior does not train the features
    torch.testing.assert_close(z.mean(dim=(2, 3)), torch.zeros(3, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(dim=(2, 3), correction=0), torch.ones(3, 1))
    energy = stage.detach().square().mean(1)
    assert torch.equal(z[:, 0].flatten(1).argsort(1), energy.flatten(1).argsort(1))  # the same order as the energy
    assert torch.equal(saliency(torch.ones(2, 4, 1, 1)), torch.zeros(2, 1, 1, 1))  # one position: no preference


@pytest.mark.parametrize("context", [False, True])
def test_saliency_prior_keeps_the_most_energetic_positions_first(context):
    """With the learned parts of the estimators zeroed, B_l = [b + w z(S_l) > 0]: lowering the
    bias b (as the mask loss does) drops the weakest positions of S_l first."""
    from aim.nn.topdown import SALIENCY_WEIGHT, saliency

    torch.manual_seed(0)
    x = stages()
    for bias in (2.0, 0.0, -1.0):
        topdown = aim.FusedTopDownMask(STAGE_CHANNELS, 5, depth=3, mask_hidden_channels=4, initial_mask_logit=bias,
                                       mask_topdown_context=context, mask_saliency_prior=True).eval()
        for estimator in topdown.mask_estimators:
            torch.nn.init.zeros_(estimator.to_logit.weight)
            torch.nn.init.zeros_(estimator.global_branch.weight)
            torch.nn.init.zeros_(estimator.global_branch.bias)
            assert estimator.saliency_weight.requires_grad and estimator.saliency_weight.item() == SALIENCY_WEIGHT
        with torch.no_grad():
            masks = topdown.run(x).masks
        for name, mask in masks.items():
            assert torch.equal(mask, (bias + SALIENCY_WEIGHT * saliency(x[name]) > 0).float()), (bias, name)
    assert aim.FusedTopDownMask(STAGE_CHANNELS, 5).mask_estimators[0].saliency_weight is None  # off by default


def test_train_config_plumbs_the_saliency_prior():
    config = TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8, mask_saliency_prior=True)
    model = build_model(config, 2)
    assert model.topdown.mask_saliency_prior and all(e.saliency_weight is not None for e in model.topdown.mask_estimators)
    assert not build_model(TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8), 2).topdown.mask_saliency_prior


def fixed_budget_pathway(fraction=0.3, budget="fixed"):
    torch.manual_seed(0)
    return aim.FusedTopDownMask(STAGE_CHANNELS, 5, depth=3, mask_hidden_channels=4, mask_budget=budget, target=fraction)


@pytest.mark.parametrize("budget", ["eval", "fixed"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
def test_fixed_budget_eval_masks_are_exactly_each_images_top_logits(fraction, budget):
    topdown = fixed_budget_pathway(fraction, budget).eval()
    x = stages()
    with torch.no_grad():
        masks = topdown(x, return_masks=True)[1]
        for i, name in enumerate(x):
            logits = topdown.mask_estimators[i](topdown._mask_input(x[name], None if i == 2 else topdown(x)[list(x)[i + 1]]))
            positions = logits[0].numel()
            k = max(1, round(fraction * positions))
            for image in range(2):
                kept = masks[name][image].flatten().bool()
                assert kept.sum().item() == k  # every image the same area, never empty
                values = logits[image].flatten()
                if k < positions:
                    assert values[kept].min() >= values[~kept].max()  # the highest logits


def test_fixed_budget_keeps_its_count_on_constant_input():
    """Ties (a plain background gives equal logits): still exactly k positions, the first ones."""
    from aim.nn.topdown import top_fraction_mask

    mask = top_fraction_mask(torch.zeros(3, 1, 4, 5), torch.tensor(0.25))
    assert mask.flatten(1).sum(1).tolist() == [5.0] * 3
    assert torch.equal(mask[0, 0, 1], torch.zeros(5)) and torch.equal(mask[0, 0, 0], torch.ones(5))


def test_fixed_budget_train_masks_keep_the_fraction_and_pass_gradients():
    topdown = fixed_budget_pathway(0.3).train()
    topdown.gumbel_noise = False  # thresholded: exactly the top k of each image
    x = stages()
    masks = topdown(x, return_masks=True)[1]
    for name, mask in masks.items():
        positions = mask[0].numel()
        assert mask.flatten(1).sum(1).tolist() == [max(1, round(0.3 * positions))] * 2
    sum(m.sum() for m in masks.values()).backward()  # straight-through: the estimators get gradients
    assert all(e.to_logit.weight.grad.abs().sum() > 0 for e in topdown.mask_estimators)
    topdown.zero_grad()
    topdown.gumbel_noise = True
    torch.manual_seed(0)
    noisy = topdown(OrderedDict((k, v.repeat(50, 1, 1, 1)) for k, v in x.items()), return_masks=True)[1]
    finest = noisy["s0"].flatten(1).mean(1)
    assert abs(finest.mean().item() - 0.3) < 0.1  # Gumbel noise moves positions in and out around the quantile


def test_eval_budget_trains_as_the_loss_budget_does():
    x = stages()
    masks = {}
    for budget in ("loss", "eval"):
        topdown = fixed_budget_pathway(0.3, budget).train()
        torch.manual_seed(1)
        masks[budget] = topdown(x, return_masks=True)[1]
    assert all(torch.equal(masks["loss"][k], masks["eval"][k]) for k in masks["loss"])


def test_fixed_budget_follows_its_fraction_buffer_and_the_checkpoint_keeps_it():
    topdown = fixed_budget_pathway(0.25).eval()
    assert topdown.active_fraction.item() == 0.25
    topdown.active_fraction.fill_(0.5)
    x = stages()
    with torch.no_grad():
        assert topdown(x, return_masks=True)[1]["s0"][0].sum().item() == round(0.5 * 81)
    restored = fixed_budget_pathway(0.25)
    restored.load_state_dict(topdown.state_dict())
    assert restored.active_fraction.item() == 0.5
    assert "active_fraction" not in aim.FusedTopDownMask(STAGE_CHANNELS, 5).state_dict()  # loss budget: no buffer


@pytest.mark.parametrize("budget", ["eval", "fixed"])
def test_fixed_budget_sparse_eval_equals_the_dense_path_and_compiles(budget):
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet(), num_classes=3, out_channels=8, mask_hidden_channels=8, mask_budget=budget).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        sparse = model(images)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
        model.topdown.sparse_eval = False
        dense = model(images)
    for name in dense.masks:
        assert torch.equal(sparse.masks[name], dense.masks[name])
        assert torch.equal(compiled.masks[name], dense.masks[name])
    torch.testing.assert_close(sparse.logits, dense.logits)


def test_mask_budget_is_validated_and_plumbed():
    with pytest.raises(ValueError, match="mask_budget must be one of"):
        aim.FusedTopDownMask(STAGE_CHANNELS, 5, mask_budget="soft")
    config = TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8, mask_budget="fixed")
    assert build_model(config, 2).topdown.mask_budget == "fixed"
    from aim.errors import UsageError
    with pytest.raises(UsageError, match="--mask-budget"):
        TrainConfig(mask_budget="soft").check()


def mask_image_model(mask_image, **kwargs):
    torch.manual_seed(0)
    return aim.AIM(SmallConvNet(), num_classes=3, out_channels=8, mask_hidden_channels=8, mask_budget="fixed", target=0.25,
                   mask_saliency_prior=True, mask_image=mask_image, **kwargs).double()


@pytest.mark.parametrize("mask_image", [False, True])
def test_with_mask_image_the_decision_has_no_gradient_outside_the_finest_mask(mask_image):
    # Eval masks are a detached top-k, so the logits' gradient to the pixels is the features'
    # alone: with mask_image it is exactly 0 wherever the finest mask (upsampled) is off; without
    # it the receptive fields of the kept positions reach pixels there.
    model = mask_image_model(mask_image).eval()
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
    output = model(images)
    output.logits.sum().backward()
    keep = torch.nn.functional.interpolate(next(iter(output.masks.values())), size=(40, 40), mode="nearest")[:, 0]
    assert 0 < int(keep.sum()) < keep.numel()
    outside = images.grad.abs().sum(1)[keep == 0]
    inside = images.grad.abs().sum(1)[keep == 1]
    assert float(inside.max()) > 0
    assert (float(outside.max()) == 0) == mask_image


def test_mask_image_runs_the_backbone_on_the_masked_image_under_the_masks_of_the_whole_one():
    model = mask_image_model(True).eval()
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        stages, masks = model.classifier_stages(images)
        whole = model.topdown.run(aim.nn.backbones.as_stage_dict(model.backbone(images))).masks
        for name in whole:
            assert torch.equal(masks[name], whole[name])
        keep = torch.nn.functional.interpolate(next(iter(whole.values())), size=(40, 40), mode="nearest")
        for got, expected in zip(stages.values(), model.backbone(images * keep)):
            assert torch.equal(got, expected)
        sparse = model(images)
        model.topdown.sparse_eval = False
        dense = model(images)
    for name in masks:
        assert torch.equal(sparse.masks[name], masks[name]) and torch.equal(dense.masks[name], masks[name])
    torch.testing.assert_close(sparse.logits, dense.logits, rtol=0, atol=1e-12)


def test_mask_image_trains_the_finest_mask_through_the_masked_image_too():
    # The finest mask's gradient is the feature pathway's (as without mask_image) plus the
    # masked image's: computed again with the second pass's stage maps held fixed, it differs.
    model = mask_image_model(True).train()
    images, labels = torch.rand(2, 3, 40, 40, dtype=torch.float64), torch.tensor([0, 2])
    output = model(images)
    finest = next(iter(output.masks))
    output.masks[finest].retain_grad()
    torch.nn.functional.cross_entropy(output.logits, labels).backward()
    masks = OrderedDict((name, mask.detach().requires_grad_()) for name, mask in output.masks.items())
    keep = torch.nn.functional.interpolate(masks[finest].detach(), size=(40, 40), mode="nearest")
    with torch.no_grad():
        held = aim.nn.backbones.as_stage_dict(model.backbone(images * keep))
    result = model.topdown.run(held, masks=masks)
    logits = model.classifier(model.topdown.pool_final(result.features, result.masks))
    torch.nn.functional.cross_entropy(logits, labels).backward()
    torch.testing.assert_close(logits, output.logits)  # the same forward
    assert masks[finest].grad.abs().sum() > 0
    assert not torch.allclose(output.masks[finest].grad, masks[finest].grad)


def test_given_masks_are_checked_and_used_as_they_are():
    topdown = aim.FusedTopDownMask(STAGE_CHANNELS, 5, depth=2, mask_hidden_channels=4)
    x = stages()
    masks = OrderedDict(s1=torch.ones(2, 1, 5, 5), s2=torch.zeros(2, 1, 3, 3))
    result = topdown.eval().run(x, masks=masks)
    assert all(result.masks[name] is masks[name] for name in masks)
    with pytest.raises(ValueError, match="mask 's2' must have shape"):
        topdown.run(x, masks={"s1": masks["s1"], "s2": torch.ones(2, 1, 2, 2)})
    with pytest.raises(ValueError, match="one mask per stage"):
        topdown.run(x, masks={"s1": masks["s1"]})
    with pytest.raises(TypeError, match="masks must be a dict"):
        topdown.run(x, masks=[masks["s1"], masks["s2"]])


def test_train_config_plumbs_mask_image():
    config = TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8)
    assert not build_model(config, 2).mask_image
    assert build_model(TrainConfig(backbone="small_convnet", topdown_channels=8, mask_channels=8, mask_image=True), 2).mask_image
