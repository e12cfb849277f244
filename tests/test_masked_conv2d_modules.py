"""Sparse evaluation in the module layer: FusedTopDownMask computes T_l with masked_conv2d, and
aim.AIM's logits come from global averages without feature maps; both against the dense eval
path (sparse_eval=False) of the same parameters.

Bounds, from rounding (u the dtype's unit roundoff, gamma_n = n u / (1 - n u)):
- features: F_l = conv_l * B_l + up(F_{l+1}). The two convolutions differ by at most
  2 (gamma_{C_in+1} + u) S_l (S_l: the convolution of |S| and |W| plus |b|; see
  test_masked_conv2d.py), the merges each round within 2u (|O_l| + |up F_{l+1}|), and the
  difference from the stage above arrives upsampled: bound_l = B_l 2 (gamma + u) S_l +
  4u (B_l S_l + |up F_{l+1}|) + up(bound_{l+1}).
- logits: both routes sum the same products in different orders; a sum of terms that are
  each built from at most n roundings is within gamma_n of the sum of |terms| (Higham, ch. 3),
  so the routes differ by at most 2 gamma_n L, L the logits computed from absolute values
  and n = (positions summed) + C_in + stages + C_out + 4.
Masks come from the same mask estimators on both routes: bit-identical.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import aim
from aim.nn.backbones import SmallConvNet, as_stage_dict
from aim.nn.topdown import footprint_counts
from merge_checks import UNIT_ROUNDOFF
from pathway_inputs import CHANNELS, near_threshold, stage_maps

pytestmark = pytest.mark.usefixtures("single_thread")


def _gamma(n, dtype):
    u = UNIT_ROUNDOFF[dtype]
    return n * u / (1 - n * u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("depth", [2, 4])
def test_fused_topdown_sparse_eval_matches_dense_eval(dtype, depth):
    torch.manual_seed(0)
    sparse = near_threshold(aim.FusedTopDownMask(CHANNELS, 16, depth=depth)).to(dtype).eval()
    dense = copy.deepcopy(sparse)
    dense.sparse_eval = False
    x = stage_maps(dtype=dtype)
    with torch.no_grad():
        features, masks = sparse(x, return_masks=True)
        expected, expected_masks = dense(x, return_masks=True)
    assert 0 < sum(m.sum().item() for m in masks.values()) < sum(m.numel() for m in masks.values())
    u = UNIT_ROUNDOFF[dtype]
    bound_above = None
    names = list(features)
    for i in reversed(range(len(names))):
        name = names[i]
        assert torch.equal(masks[name], expected_masks[name])
        conv = sparse.lateral[i]
        magnitude = F.conv2d(x[name].double().abs(), conv.weight.double().abs(), conv.bias.double().abs())
        b = masks[name].double()
        gamma = _gamma(conv.weight[0].numel() + 1, dtype)
        above = 0 if i == len(names) - 1 else F.interpolate(expected[names[i + 1]].double().abs(), size=b.shape[-2:], mode="nearest")
        bound = b * 2 * (gamma + u) * magnitude + 4 * u * (b * magnitude + above)
        if bound_above is not None:
            bound = bound + F.interpolate(bound_above, size=b.shape[-2:], mode="nearest")
        diff = (features[name].double() - expected[name].double()).abs()
        assert (diff <= bound).all(), f"{name}: worst excess {(diff - bound).max().item():.3g}"
        bound_above = bound


def test_reference_path_sparse_eval_is_the_dense_composition():
    # use_reference runs reference.masked_conv2d: conv2d then the merge, the dense path's arithmetic
    torch.manual_seed(0)
    sparse = near_threshold(aim.FusedTopDownMask(CHANNELS, 16, depth=3, use_reference=True)).eval()
    dense = copy.deepcopy(sparse)
    dense.sparse_eval = False
    x = stage_maps()
    with torch.no_grad():
        for a, b in zip(sparse(x).values(), dense(x).values()):
            assert torch.equal(a, b)


def _logit_magnitude(model, stages, masks, final):
    """|logits| computed from absolute values (float64): the final classifier when final, else
    each stage classifier; and the number of positions each one sums."""
    td = model.topdown
    names = list(masks)
    size = masks[names[0]].shape[-2:]
    pooled_final, per_stage = 0, []
    for i, name in enumerate(names):
        stage, m = stages[name].double().abs(), masks[name].double().abs()
        h, w = m.shape[-2:]
        if final:
            counts = footprint_counts((h, w), [stages[n].shape[-2:] for n in reversed(names[:i])]).double()
            weights = m * counts / (size[0] * size[1])
        else:
            weights = m / (h * w)
        weighted = torch.einsum("nchw,nhw->nc", stage, weights[:, 0])
        conv = td.lateral[i]
        pooled = weighted @ conv.weight.double().abs().flatten(1).T + weights.sum((1, 2, 3))[:, None] * conv.bias.double().abs()
        pooled_final = pooled_final + pooled
        clf = model.stage_classifiers[i]
        per_stage.append((pooled @ clf.weight.double().abs().T + clf.bias.double().abs(), h * w))
    if final:
        clf = model.classifier
        return pooled_final @ clf.weight.double().abs().T + clf.bias.double().abs(), size[0] * size[1]
    return per_stage


def balance_masks(model, stages):
    """Shift each mask estimator's logit bias by its median logit on these stages, so every
    mask keeps about half the positions (the footprint weights then matter at every stage)."""
    names = list(stages)[len(stages) - model.topdown.depth:]
    with torch.no_grad():
        for estimator, name in zip(model.topdown.mask_estimators, names):
            estimator.to_logit.bias -= estimator(stages[name]).median()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_aim_sparse_eval_logits_match_dense_eval(dtype, depth):
    torch.manual_seed(0)
    # the paper's pathway: balance_masks feeds each estimator its stage alone (the default's
    # top-down context has its own sparse-vs-dense test in test_mask_options.py)
    model = aim.AIM(SmallConvNet((8, 16, 32, 64)), num_classes=3, depth=depth, out_channels=16, mask_hidden_channels=8,
                    mask_topdown_context=False)
    model = model.to(dtype).eval()
    images = torch.randn(2, 3, 45, 37, dtype=dtype)  # odd sizes: no upsampling is an exact x2
    with torch.no_grad():
        stages = as_stage_dict(model.backbone(images))
    balance_masks(model, stages)
    dense = copy.deepcopy(model)
    dense.topdown.sparse_eval = False
    with torch.no_grad():
        out, expected = model(images), dense(images)
    names = list(out.masks)
    assert names == list(expected.masks)
    for name in names:
        assert torch.equal(out.masks[name], expected.masks[name])
        assert 0.2 < out.masks[name].mean().item() < 0.8
    extra = max(model.topdown.in_channels_list) + depth + 16 + 4
    magnitude, positions = _logit_magnitude(model, stages, out.masks, final=True)
    bound = 2 * _gamma(positions + extra, dtype) * magnitude
    assert ((out.logits.double() - expected.logits.double()).abs() <= bound).all()
    for (magnitude, positions), name in zip(_logit_magnitude(model, stages, out.masks, final=False), names):
        bound = 2 * _gamma(positions + extra, dtype) * magnitude
        assert ((out.stage_logits[name].double() - expected.stage_logits[name].double()).abs() <= bound).all(), name


def test_sparse_eval_switch_leaves_training_alone():
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet((8, 16, 32, 64)), num_classes=2, depth=2, out_channels=16, mask_hidden_channels=8)
    assert model.topdown.sparse_eval  # on by default
    dense = copy.deepcopy(model)
    dense.topdown.sparse_eval = False
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(images)
    torch.manual_seed(1)
    b = dense(images)
    assert torch.equal(a.logits, b.logits)
