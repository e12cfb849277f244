"""Comparison of a topdown_merge backend's results with the reference, shared by the Triton
and CUDA tests. Each bound follows from how the two sides round, not from fitted constants.

- Forward, float32/float64: one multiply and one add, rounded separately in both: bit-identical.
- Forward, half types: the kernels round feat*mask + prev once (float32 inside); the reference
  rounds the product, then the sum. Both errors are at most u * (|feat*mask| + |result|), u the
  unit roundoff, so they differ by at most 4u * (|feat*mask| + |prev|). Under cancellation that
  is more than one ulp of the result, which is why a plain rtol/atol on the output is wrong.
- grad_feat = g*mask and a full mask's g*feat are single products: bit-identical in every dtype.
- Sums (a broadcast mask's gradient over channels, grad_prev over a footprint) run in another
  order than the reference's autograd: they differ by at most (terms + 2) * u * sum(|term|).
- Triton's interpreter (numpy has no bfloat16) converts float32 to bfloat16 by truncation, not
  round-to-nearest-even as the compiled kernels do (cvt.rn, checked in the AOT test); with
  truncating_bfloat16=True every bfloat16 result may be one more ulp (<= 2u |x|) off.
"""
import torch

from aim_kernels import reference

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _assert_within(actual, expected, bound, what):
    diff = (actual.double() - expected.double()).abs()
    bad = diff > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the rounding bound; "
                           f"worst excess {(diff - bound).max().item():.3g} at {tuple(bad.nonzero()[0].tolist())}")


def _assert_equal(actual, expected, what, slack=0):
    if slack:
        _assert_within(actual, expected, slack * expected.double().abs() + torch.finfo(expected.dtype).tiny, what)
        return
    assert torch.equal(actual, expected), f"{what}: not bit-identical, max diff {(actual.double() - expected.double()).abs().max()}"


def _truncation_slack(dtype, truncating_bfloat16):
    return 2 * UNIT_ROUNDOFF[dtype] if truncating_bfloat16 and dtype == torch.bfloat16 else 0


def check_forward(out, feat, mask, prev, truncating_bfloat16=False):
    expected = reference.topdown_merge(feat, mask, prev)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if feat.dtype in (torch.float32, torch.float64):
        _assert_equal(out, expected, "out")
        return
    product = (feat.double() * mask.double()).abs()
    upsampled = 0 if prev is None else reference.topdown_merge(torch.zeros_like(feat).double(), mask.double(), prev.double()).abs()
    u = UNIT_ROUNDOFF[feat.dtype]
    slack = _truncation_slack(feat.dtype, truncating_bfloat16) * expected.double().abs()
    _assert_within(out, expected, 4 * u * (product + upsampled) + slack + torch.finfo(feat.dtype).tiny, "out")


def check_backward(grads, grad, feat, mask, prev_size, truncating_bfloat16=False):
    expected = reference.topdown_merge_backward(grad, feat, mask, prev_size)
    u = UNIT_ROUNDOFF[feat.dtype]
    slack = _truncation_slack(feat.dtype, truncating_bfloat16)
    tiny = torch.finfo(feat.dtype).tiny
    _assert_equal(grads[0], expected[0], "grad_feat", slack)
    # sum(|term|) of each reduction: the reference's own backward on magnitudes, in float64
    magnitudes = reference.topdown_merge_backward(grad.double().abs(), feat.double().abs(), mask.double().abs(), prev_size)
    channels = feat.shape[1]
    if mask.shape[1] == channels and channels > 1:
        _assert_equal(grads[1], expected[1], "grad_mask", slack)
    else:
        bound = (channels + 2) * u * magnitudes[1] + slack * expected[1].double().abs() + tiny
        _assert_within(grads[1], expected[1], bound, "grad_mask")
    if len(prev_size) == 2:
        footprint = reference.topdown_merge_backward(torch.ones_like(grad).double(), feat.double(), mask.double(), prev_size)[2]
        bound = (footprint + 2) * u * magnitudes[2] + slack * expected[2].double().abs() + tiny
        _assert_within(grads[2], expected[2], bound, "grad_prev")
    else:
        assert grads[2].numel() == 0
