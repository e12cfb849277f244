"""aim.FusedTopDownMask: the FPN drop-in contract, fused vs reference path, train/eval, gradients."""
import copy
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork

import aim
from aim.nn.topdown import MaskEstimator
from pathway_inputs import CHANNELS, assert_gradients_close, near_threshold, stage_maps


pytestmark = pytest.mark.usefixtures("single_thread")


def test_same_input_and_output_types_as_torchvision_fpn():
    x = stage_maps()
    fpn_out = FeaturePyramidNetwork(CHANNELS, 32)(x)
    out = aim.FusedTopDownMask(CHANNELS, 32)(x)
    assert isinstance(out, OrderedDict)
    assert list(out) == list(fpn_out)
    for name in out:
        assert out[name].shape == fpn_out[name].shape


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_depth_runs_through_the_coarsest_stages(depth):
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=depth)
    x = stage_maps()
    out = module(x)
    assert list(out) == list(x)[4 - depth:]
    for name, t in out.items():
        assert t.shape == (2, 16, *x[name].shape[-2:])
    assert list(module.last_masks) == list(out)
    assert len(module.lateral) == len(module.mask_estimators) == depth


def test_masks_exposed_without_changing_the_return_type():
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=3)
    x = stage_maps()
    features, masks = module(x, return_masks=True)
    assert list(masks) == list(features)
    for name, mask in masks.items():
        assert mask.shape == (2, 1, *x[name].shape[-2:])
        assert mask.requires_grad  # in the graph, for the mask loss
        assert not module.last_masks[name].requires_grad
        assert set(torch.unique(mask.detach()).tolist()) <= {0.0, 1.0}


def test_output_is_the_topdown_recursion():
    """F_l = T_l(S_l) * B_l + nearest-up(F_l+1), from the parts, in eval mode (B_l = logits >= 0)."""
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=3).eval()
    x = stage_maps()
    out = module(x)
    names = list(x)[1:]
    prev = None
    with torch.no_grad():
        for i in reversed(range(3)):
            stage = x[names[i]]
            mask = (module.mask_estimators[i](stage) >= 0).float()
            expected = module.lateral[i](stage) * mask
            if prev is not None:
                expected = expected + torch.nn.functional.interpolate(prev, size=stage.shape[-2:], mode="nearest")
            torch.testing.assert_close(out[names[i]], expected)
            prev = expected


def _run(module, x, seed):
    torch.manual_seed(seed)
    features, masks = module(x, return_masks=True)
    loss = sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in features.values())
    inputs = [x[name] for name in features]
    grads = torch.autograd.grad(loss, inputs + list(module.parameters()), allow_unused=True)
    return features, masks, grads


@pytest.mark.parametrize("training", [True, False])
def test_fused_and_reference_paths_agree(training):
    """Same parameters and seed: identical masks, outputs and gradients on both paths."""
    torch.manual_seed(0)
    # dense eval: the sparse lateral convolution rounds differently (tests/test_masked_conv2d_modules.py)
    fused = near_threshold(aim.FusedTopDownMask(CHANNELS, 16, depth=3, sparse_eval=False)).train(training)
    reference = copy.deepcopy(fused)
    reference.use_reference = True
    x = stage_maps(requires_grad=True)
    f_feat, f_masks, f_grads = _run(fused, x, seed=123)
    r_feat, r_masks, r_grads = _run(reference, x, seed=123)
    for name in f_masks:
        assert torch.equal(f_masks[name], r_masks[name])
        # The forward is the same float32 arithmetic on both paths (no FMA contraction).
        torch.testing.assert_close(f_feat[name], r_feat[name], rtol=0, atol=0)
    for f, r in zip(f_grads, r_grads):
        assert (f is None) == (r is None)
        if f is not None:
            assert_gradients_close(f, r)
    if training:
        assert 0 < sum(m.sum().item() for m in f_masks.values()) < sum(m.numel() for m in f_masks.values())


def test_train_samples_and_eval_thresholds():
    torch.manual_seed(0)
    module = near_threshold(aim.FusedTopDownMask(CHANNELS, 16, depth=2))
    x = stage_maps()
    module.eval()
    _, eval_a = module(x, return_masks=True)
    _, eval_b = module(x, return_masks=True)
    with torch.no_grad():
        logits = module.mask_estimators[0](x["feat2"])
    for name in eval_a:
        assert torch.equal(eval_a[name], eval_b[name])
    assert torch.equal(eval_a["feat2"], (logits >= 0).float())
    module.train()
    torch.manual_seed(1)
    _, train_a = module(x, return_masks=True)
    torch.manual_seed(2)
    _, train_b = module(x, return_masks=True)
    torch.manual_seed(1)
    _, train_a_again = module(x, return_masks=True)
    assert not torch.equal(train_a["feat2"], train_b["feat2"])
    assert torch.equal(train_a["feat2"], train_a_again["feat2"])


def test_gradient_reaches_the_mask_estimator_through_straight_through():
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=2)
    features = module(stage_maps())
    sum(f.square().mean() for f in features.values()).backward()
    for estimator in module.mask_estimators:
        for name, p in estimator.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_channels_last_input_gives_the_same_output():
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=3).eval()
    x = stage_maps()
    x_cl = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) for k, v in x.items())
    out, out_cl = module(x), module(x_cl)
    for name in out:
        torch.testing.assert_close(out_cl[name], out[name], rtol=1e-5, atol=1e-5)


def test_mask_estimator_starts_mostly_active():
    estimator = MaskEstimator(8, hidden_channels=16).eval()
    with torch.no_grad():
        logits = estimator(torch.randn(4, 8, 9, 9))
    assert logits.shape == (4, 1, 9, 9)
    assert (logits >= 0).float().mean() > 0.8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=5), "depth must be an int in 1..4"),
        (dict(depth=0), "depth must be an int in 1..4"),
        (dict(temperature=0.0), "temperature"),
        (dict(target=1.5), "target"),
        (dict(in_channels_list=[]), "in_channels_list"),
        (dict(out_channels=0), "out_channels"),
        (dict(mask_hidden_channels=0), "mask_hidden_channels must be a positive int"),
        (dict(mask_blocks=-1), "mask_blocks must be an int >= 0"),
        (dict(mask_blocks=1.5), "mask_blocks must be an int >= 0"),
        (dict(mask_estimator="sparse"), "mask_estimator must be one of dense, separable"),
    ],
)
def test_bad_configuration(kwargs, message):
    args = dict(in_channels_list=CHANNELS, out_channels=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        aim.FusedTopDownMask(**args)


def test_bad_input():
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=2)
    x = stage_maps()
    with pytest.raises(ValueError, match="stage 'feat2' has 17 channels but in_channels_list says 16"):
        module(stage_maps(channels=[8, 12, 17, 24]))
    with pytest.raises(ValueError, match="3 stage maps"):
        module(OrderedDict(list(x.items())[:3]))
    with pytest.raises(TypeError, match="dict"):
        module(list(x.values()))
    with pytest.raises(ValueError, match="finest first"):
        module(stage_maps(sizes=[(23, 19), (12, 10), (3, 3), (6, 5)]))
    uneven = stage_maps()
    uneven["feat3"] = uneven["feat3"][:1]
    with pytest.raises(ValueError, match=f"stage 'feat3' has 1 images, stage 'feat0' {x['feat0'].shape[0]}"):
        module(uneven)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiles_without_graph_breaks_including_last_masks(training):
    """The drop-in module alone under fullgraph=True: the ops and the last_masks attribute
    update trace into one graph (aot_eager: dynamo + AOTAutograd, see test_aim_model), and
    give eager's values and gradients bit for bit (aot_eager runs the same ATen ops and replays the seed draw from the same
    generator, so after the same manual_seed the Gumbel masks agree too)."""
    module = aim.FusedTopDownMask(CHANNELS, 16, depth=2).train(training)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = stage_maps()
    results = []
    for run in (compiled, module):
        module.zero_grad()
        torch.manual_seed(7)
        out = run(x)
        sum((f * f).sum() for f in out.values()).backward()
        results.append(({k: v.detach() for k, v in out.items()}, dict(module.last_masks),
                        {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (out, masks, grads), (out_eager, masks_eager, grads_eager) = results
    assert list(module.last_masks) == list(out) == ["feat2", "feat3"]
    for name in out_eager:
        assert torch.equal(masks[name], masks_eager[name])
        assert torch.equal(out[name], out_eager[name])
    assert grads.keys() == grads_eager.keys() and "mask_estimators.0.to_logit.weight" in grads
    for name in grads_eager:
        assert torch.equal(grads[name], grads_eager[name]), name


def test_separable_estimators_train_every_parameter():
    """mask_estimator="separable": a 1x1 stem, depthwise 3x3 + pointwise 1x1 in each block; one
    training step's loss reaches every parameter of every estimator."""
    torch.manual_seed(0)
    module = aim.FusedTopDownMask(CHANNELS, out_channels=8, depth=2, mask_hidden_channels=8, mask_topdown_context=True,
                                  mask_estimator="separable").train()
    for estimator in module.mask_estimators:
        assert estimator.stem[0].kernel_size == (1, 1) and len(estimator.blocks) == 3
        assert all(block.depthwise1.groups == 8 and block.pointwise1.kernel_size == (1, 1) for block in estimator.blocks)
    features, masks = module(stage_maps(), return_masks=True)
    (sum(f.square().mean() for f in features.values()) + sum(m.mean() for m in masks.values())).backward()
    for name, p in module.mask_estimators.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("blocks", [0, 1])
def test_mask_blocks_sets_the_estimators_depth_and_the_pathway_still_runs(blocks):
    module = aim.FusedTopDownMask(CHANNELS, out_channels=8, depth=2, mask_hidden_channels=8, mask_blocks=blocks)
    assert all(len(estimator.blocks) == blocks for estimator in module.mask_estimators)
    features, masks = module(stage_maps(), return_masks=True)
    assert list(features) == ["feat2", "feat3"] and all(m.shape[1] == 1 for m in masks.values())
