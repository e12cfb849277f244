"""The mask-area leak report and the exact decision audit (aim.analysis.audit), and AIM's
"active" pooling they motivate."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aim
from aim.analysis import audit
from aim.nn.backbones import BaselineClassifier, SmallConvNet
from aim.data.common import TensorDataset
from aim.app.evaluate import evaluate, format_table

# float64 models: the audit's identity is then checked to float64 rounding over a sum of a few
# hundred terms of size ~1, far below this.
IDENTITY_ATOL = 1e-10


def brute_force_auc(scores, positives):
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_is_the_pairwise_win_rate_with_ties_counted_half():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (41,), generator=g).double()  # many ties
    positives = torch.rand(41, generator=g) < 0.4
    assert audit.roc_auc(scores, positives) == pytest.approx(brute_force_auc(scores.tolist(), positives.tolist()), abs=1e-12)
    assert audit.roc_auc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
    assert audit.roc_auc(torch.ones(4), torch.tensor([False, True, False, True])) == 0.5
    assert audit.roc_auc(torch.arange(3.0), torch.zeros(3, dtype=torch.bool)) is None


class PooledImage(nn.Module):
    """A parameter-free backbone: the image average-pooled by 2 and by 4, so each stage's
    channels are the image's (16x16 images: 8x8 and 4x4 stages)."""

    def forward(self, x):
        return [F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]


class ChannelMask(nn.Module):
    """A mask estimator whose eval mask is exactly where ``channel`` of the stage is >= 1/2."""

    def __init__(self, channel):
        super().__init__()
        self.channel = channel

    def forward(self, stage):
        return 20.0 * (stage[:, self.channel:self.channel + 1] - 0.5) + 1e-3


class MedianSplit(nn.Module):
    """A mask estimator that keeps the positions where the channel sum of its input is above
    its median in the image: about half of them."""

    def forward(self, stage):
        total = stage.sum(1, keepdim=True)
        return total - total.flatten(1).median(1).values[:, None, None, None] - 1e-9


def marker_dataset():
    """A full factorial over label, place and an object size: channel 0 is a square whose side
    depends on the label only (0 for class 0: nothing; 8 for class 1), channel 1 a square whose
    side (4, 8 or 12) is independent of label and place, in equal numbers per group."""
    rows = list(itertools.product((0, 1), (0, 1), (4, 8, 12), (0, 1)))  # label, place, side, repeat
    images = torch.zeros(len(rows), 3, 16, 16)
    for i, (label, _, side, _) in enumerate(rows):
        images[i, 0, :8 * label, :8 * label] = 1.0
        images[i, 1, :side, :side] = 1.0
    labels = torch.tensor([r[0] for r in rows])
    groups = torch.tensor([2 * r[0] + r[1] for r in rows])
    foregrounds = images[:, 1:2].clone()
    return TensorDataset(images, labels, groups, ["a", "b"], ["a/0", "a/1", "b/0", "b/1"], foregrounds)


def marker_model(channel):
    torch.manual_seed(0)
    # "loss" budget: the eval masks are the estimator's own thresholds, leaky by construction
    model = aim.AIM(PooledImage(), num_classes=2, depth=2, stage_channels=[3, 3], out_channels=4, mask_hidden_channels=2,
                    mask_budget="loss")
    for i in range(2):
        model.topdown.mask_estimators[i] = ChannelMask(channel)
    return model


def test_leak_report_tells_a_mask_whose_area_is_the_class_from_one_whose_area_is_not():
    dataset = marker_dataset()
    leaky = evaluate(marker_model(0), dataset, batch_size=7, with_gradcam=False)["mask_area_leak"]
    honest = evaluate(marker_model(1), dataset, batch_size=7, with_gradcam=False)["mask_area_leak"]
    assert list(leaky) == list(honest) == ["0", "1"]
    for stage in ("0", "1"):
        assert leaky[stage]["auc_class"] == 1.0  # every class-1 mask is larger than every class-0 one
        assert leaky[stage]["empty_share"] == 0.5  # class 0's masks are all empty
        assert leaky[stage]["active_by_class"][0] == 0.0
        # Within each class the area does not depend on the place: a perfect class leak is
        # no background leak.
        assert leaky[stage]["auc_background"] == 0.5
        assert honest[stage]["auc_class"] == honest[stage]["auc_background"] == 0.5  # same sizes in every group
        assert honest[stage]["empty_share"] == 0.0
        by_group = honest[stage]["active_by_group"]
        assert by_group == pytest.approx([by_group[0]] * 4)
    # The fractions are the squares' areas: side 4, 8, 12 of 16 -> (16 + 64 + 144) / 3 / 256.
    assert honest["0"]["active_by_class"] == pytest.approx([(16 + 64 + 144) / 3 / 256] * 2)


def test_leak_report_with_more_than_two_values_takes_the_most_predictive_one_vs_rest():
    fractions = torch.tensor([0.1, 0.3, 0.5, 0.5, 0.3, 0.1])  # classes 0 and 2 alike, class 1 apart
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    report = audit.mask_area_leak({"s": fractions}, labels, None, num_classes=3)["s"]
    assert report["auc_class"] == 1.0  # class 1 vs rest: its masks are the largest
    assert report["auc_background"] is None and report["active_by_group"] is None
    assert report["active_by_class"] == pytest.approx([0.2, 0.5, 0.2])


def aim_model(pooling, context, sparse_eval=True, mask_budget="eval", mask_image=False):
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet(), num_classes=3, depth=2, out_channels=8, mask_hidden_channels=4,
                    initial_mask_logit=0.0, pooling=pooling, mask_topdown_context=context, sparse_eval=sparse_eval,
                    mask_budget=mask_budget, mask_image=mask_image)
    for i in range(model.topdown.depth):  # a freshly initialized estimator's masks are all on or all off
        model.topdown.mask_estimators[i] = MedianSplit()
    return model.double().eval()


def images(n=4, size=37):  # odd size: the nearest upsampling footprints are uneven
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("pooling", aim.nn.topdown.POOLINGS)
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("mask_image", [False, True])
def test_aim_decision_is_exactly_the_sum_of_its_contributions_and_the_bias(pooling, context, mask_image):
    model, x = aim_model(pooling, context, mask_image=mask_image), images()
    result = audit.decision_contributions(model, x)
    logits = model(x).logits  # the sparse eval path: the audit explains the model's own logits
    torch.testing.assert_close(result["logits"], logits, rtol=0, atol=IDENTITY_ATOL)
    top2 = logits.topk(2, dim=1)
    torch.testing.assert_close(result["margin"], top2.values[:, 0] - top2.values[:, 1], rtol=0, atol=IDENTITY_ATOL)
    torch.testing.assert_close(result["contributions"].sum((1, 2)) + result["bias"], result["margin"], rtol=0, atol=IDENTITY_ATOL)
    # Outside every stage's upsampled mask a position contributes exactly nothing.
    masks = model(x).masks.values()
    grid = result["contributions"].shape[-2:]
    union = torch.stack([F.interpolate(m, size=grid, mode="nearest")[:, 0] for m in masks]).amax(0)
    assert 0 < int((union == 0).sum()) < union.numel()
    assert torch.all(result["contributions"][union == 0] == 0)


def test_baseline_decision_is_exactly_the_sum_of_its_contributions_and_the_bias():
    torch.manual_seed(0)
    model, x = BaselineClassifier(SmallConvNet(), num_classes=3).double().eval(), images()
    result = audit.decision_contributions(model, x)
    torch.testing.assert_close(result["logits"], model(x), rtol=0, atol=IDENTITY_ATOL)
    torch.testing.assert_close(result["contributions"].sum((1, 2)) + result["bias"], result["margin"], rtol=0, atol=IDENTITY_ATOL)


def test_decision_audit_rejects_other_models_and_single_class_heads():
    with pytest.raises(TypeError, match="aim.AIM or"):
        audit.decision_contributions(nn.Linear(2, 2), images())
    torch.manual_seed(0)
    single = BaselineClassifier(SmallConvNet(), num_classes=1).double().eval()
    with pytest.raises(ValueError, match="two classes"):
        audit.decision_contributions(single, images())


def test_per_pixel_decision_map_keeps_the_total_and_the_shares_split_it():
    contributions = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]]], dtype=torch.float64)  # (1, 2, 3)
    pixels = audit.contributions_at(contributions, (5, 7))
    assert pixels.shape == (1, 5, 7)
    torch.testing.assert_close(pixels.sum(), contributions.sum())
    # Each cell's value is spread over the pixels nearest upsampling maps to it.
    cell_of_pixel = F.interpolate(torch.arange(6.0).view(1, 1, 2, 3), size=(5, 7), mode="nearest")[0, 0].long()
    for cell in range(6):
        torch.testing.assert_close(pixels[0][cell_of_pixel == cell].sum(), contributions.flatten()[cell])
    foreground = (cell_of_pixel == 4).view(1, 1, 5, 7)  # the object is exactly cell (1, 1)
    shares = audit.decision_shares({"contributions": contributions, "bias": torch.tensor([-0.5], dtype=torch.float64)}, foreground)
    total = 3.0 + 0.5 + 0.5  # |object| + |background (1 - 2 + 0.5 + 0 + 1)| + |bias|
    assert shares["object"].item() == pytest.approx(3.0 / total)
    assert shares["background"].item() == pytest.approx(0.5 / total)
    assert shares["bias"].item() == pytest.approx(-0.5 / total)
    nothing = audit.decision_shares({"contributions": torch.zeros(1, 2, 3), "bias": torch.zeros(1)}, foreground)
    assert all(v.item() == 0 for v in nothing.values())


def test_active_pooling_averages_the_final_map_over_the_union_of_the_masks_only():
    model, x = aim_model("active", False, sparse_eval=False), images()
    result = model.topdown.run(dict(zip(("0", "1", "2", "3"), model.backbone(x))))
    final = next(iter(result.features.values()))
    union = torch.stack([F.interpolate(m, size=final.shape[-2:], mode="nearest") for m in result.masks.values()]).amax(0)
    expected = final.sum((2, 3)) / union.flatten(1).sum(1, keepdim=True)
    torch.testing.assert_close(model.topdown.pool_final(result.features, result.masks), expected, rtol=0, atol=IDENTITY_ATOL)
    # The stage heads average O_l over B_l's active positions.
    dense = aim_model("active", False, sparse_eval=False)(x)
    sparse = aim_model("active", False, sparse_eval=True)(x)
    torch.testing.assert_close(sparse.logits, dense.logits, rtol=0, atol=IDENTITY_ATOL)
    for name in dense.stage_logits:
        torch.testing.assert_close(sparse.stage_logits[name], dense.stage_logits[name], rtol=0, atol=IDENTITY_ATOL)


@pytest.mark.parametrize("sparse_eval", [False, True])
def test_active_pooling_of_an_empty_mask_gives_the_bias_alone(sparse_eval):
    model = aim_model("active", False, sparse_eval=sparse_eval, mask_budget="loss")  # the other budgets never empty a mask
    for i in range(model.topdown.depth):
        model.topdown.mask_estimators[i] = ChannelMask(0).double()
    x = images().clamp(max=0.0)  # channel 0 of the stage is then < 1/2 everywhere: no mask is on
    output = model(x)
    assert all(int(m.sum()) == 0 for m in output.masks.values())
    torch.testing.assert_close(output.logits, model.classifier.bias.expand_as(output.logits), rtol=0, atol=0)


def test_pooling_is_validated():
    with pytest.raises(ValueError, match="pooling must be one of"):
        aim.FusedTopDownMask([4, 6], 5, pooling="max")


def test_evaluate_reports_the_leak_and_the_audit_per_group_in_json_and_table():
    dataset = marker_dataset()
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet(), num_classes=2, depth=2, out_channels=8, mask_hidden_channels=4, initial_mask_logit=0.0)
    result = evaluate(model, dataset, batch_size=10, with_gradcam=False)
    assert set(result["mask_area_leak"]) == {"2", "3"}
    decision = result["decision_audit"]
    assert set(decision) == {"object", "background", "bias", "by_group"}
    for name in audit.SHARE_NAMES:
        assert -1 <= decision[name] <= 1 and len(decision["by_group"][name]) == 4
    # Per image the three shares' absolute values sum to 1.
    assert abs(decision["object"]) + abs(decision["background"]) + abs(decision["bias"]) <= 1 + 1e-9
    table = format_table(result, dataset.class_names, dataset.group_names)
    assert "decision on object/bg/bias" in table and "mask 2 area AUC" in table and "mask 3 empty share" in table
    without = evaluate(model, dataset, batch_size=10, with_gradcam=False, with_audit=False)
    assert "decision_audit" not in without and without["mask_area_leak"] == result["mask_area_leak"]
