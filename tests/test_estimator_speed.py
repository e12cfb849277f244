"""The mask estimator's inference speed switches (eval_channels_last, fold_batchnorm) compute
the same function as the modules they bypass, up to rounding.

Tolerance: both float32 paths are compared with the float64 evaluation of the same module; the
fast path may be at most 4x further from it than the unswitched path's own rounding error
(plus a few ulps of the output's scale). Folding reassociates each convolution's sum with the
BatchNorm scale and channels_last reorders the reduction, so their error is of the same kind
and size as the original's, not smaller."""
import copy

import pytest
import torch
from torch import nn

import aim
from aim.nn.backbones import SmallConvNet
from aim.nn.topdown import MASK_ESTIMATORS, MaskEstimator

SWITCHES = ("eval_channels_last", "fold_batchnorm")
kinds = pytest.mark.parametrize("kind", MASK_ESTIMATORS)


def switched_off(module):
    off = copy.deepcopy(module)
    for m in off.modules():
        if isinstance(m, MaskEstimator):
            for s in SWITCHES:
                setattr(m, s, False)
    return off


def randomized_estimator(in_channels=24, hidden=16, kind="dense"):
    est = MaskEstimator(in_channels, hidden, kind=kind)
    with torch.no_grad():
        for m in est.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so the fold does something
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return est.eval()


def assert_as_close_as_the_original(fast, slow, exact):
    slow_error = (slow.double() - exact).abs().max().item()
    fast_error = (fast.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert fast_error <= 4 * slow_error + 4 * 1.2e-7 * scale, (fast_error, slow_error, scale)


@kinds
@pytest.mark.parametrize("size", [(9, 9), (7, 5), (1, 1)])
def test_eval_switches_match_the_modules(size, kind):
    est = randomized_estimator(kind=kind)
    x = torch.randn(3, 24, *size)
    with torch.no_grad():
        fast, slow = est(x), switched_off(est)(x)
        exact = switched_off(est).double()(x.double())
    assert fast.shape == slow.shape == (3, 1, *size)
    assert_as_close_as_the_original(fast, slow, exact)


@kinds
def test_each_switch_alone(kind):
    est = randomized_estimator(kind=kind)
    x = torch.randn(2, 24, 6, 6)
    with torch.no_grad():
        slow = switched_off(est)(x)
        exact = switched_off(est).double()(x.double())
        for switch in SWITCHES:
            one = switched_off(est)
            setattr(one, switch, True)
            assert_as_close_as_the_original(one(x), slow, exact)


@kinds
def test_folded_weights_follow_parameter_updates(kind):
    est = randomized_estimator(kind=kind)
    x = torch.randn(2, 24, 6, 6)
    with torch.no_grad():
        est(x)  # fills the cache
        est.stem[1].running_mean.add_(0.25)  # in place: a new version
        for weight in est.blocks[0].parameters():  # the folded convs' and (separable) the depthwise ones'
            weight.mul_(1.5)
        assert_as_close_as_the_original(est(x), switched_off(est)(x), switched_off(est).double()(x.double()))
        est.load_state_dict(randomized_estimator(kind=kind).state_dict())  # copied in place as well
        assert_as_close_as_the_original(est(x), switched_off(est)(x), switched_off(est).double()(x.double()))
    est2 = randomized_estimator(kind=kind)
    est2.load_state_dict(est.state_dict())
    est2.stem[1].running_mean.data = est2.stem[1].running_mean.data + 0.25  # replaced storage
    with torch.no_grad():
        assert_as_close_as_the_original(est2(x), switched_off(est2)(x), switched_off(est2).double()(x.double()))


@kinds
def test_gradients_in_eval_mode_reach_every_parameter(kind):
    """With grad enabled (fine-tuning with frozen BatchNorm, attribution) the modules run:
    gradients reach the BatchNorm affine parameters, equal to the unswitched path's."""
    est = randomized_estimator(kind=kind)
    slow = switched_off(est)
    x = torch.randn(2, 24, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    est(x).square().sum().backward()
    slow(x2).square().sum().backward()
    for (name, p), q in zip(est.named_parameters(), slow.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@kinds
def test_train_mode_is_untouched(kind):
    est = randomized_estimator(kind=kind).train()
    slow = switched_off(est)
    x = torch.randn(4, 24, 6, 6)
    assert torch.equal(est(x), slow(x))


@pytest.mark.parametrize("kind, layer", [("dense", "bn2"), ("separable", "bn2"), ("separable", "depthwise1")])
def test_swapped_layers_fall_back_to_the_modules(kind, layer):
    """A layer the fold does not know (a BatchNorm, or a depthwise conv, replaced): the modules
    run, exactly as with the switch off."""
    est = randomized_estimator(kind=kind)
    setattr(est.blocks[1], layer, nn.Identity())
    est.eval_channels_last = False
    x = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        assert torch.equal(est(x), switched_off(est)(x))


@kinds
@pytest.mark.parametrize("mask_topdown_context", [True, False])
def test_aim_eval_outputs_and_masks_unchanged(mask_topdown_context, kind):
    torch.manual_seed(0)
    model = aim.AIM(SmallConvNet(), num_classes=3, depth=2, mask_topdown_context=mask_topdown_context, mask_estimator=kind)
    model.train()
    images = torch.randn(4, 3, 64, 64)
    model(images)  # BatchNorm running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        fast, slow = model(images), switched_off(model)(images)
        exact = switched_off(model).double()(images.double())
    for name in slow.masks:  # ties within rounding of the k-th logit would differ; these inputs have none
        assert torch.equal(fast.masks[name], slow.masks[name]), name
    assert_as_close_as_the_original(fast.logits, slow.logits, exact.logits)
    for name in slow.stage_logits:
        assert_as_close_as_the_original(fast.stage_logits[name], slow.stage_logits[name], exact.stage_logits[name])
