"""Plain-PyTorch reference of every op: the test oracle and the fallback path.

Written for clarity, not speed. Each function states the op's exact semantics.
"""
import struct

import torch
import torch.nn.functional as F

from aim_kernels._library import memory_format_of


def topdown_merge(feat, mask, prev=None):
    """feat * mask + nearest-upsample(prev) to feat's spatial size (F.interpolate's index rule)."""
    out = feat * mask
    if prev is not None and out.numel() > 0:  # F.interpolate rejects empty tensors
        out = out + F.interpolate(prev, size=feat.shape[-2:], mode="nearest")
    return out


def topdown_merge_backward(grad_out, feat, mask, prev_size):
    """Gradients of topdown_merge, the ATen ops autograd of the forward above would run.

    prev_size is [h, w] of prev, or [] when there was none (grad_prev is then empty)."""
    grad_feat = grad_out * mask
    grad_mask = grad_out * feat
    if mask.shape[1] == 1 and feat.shape[1] != 1:  # summed over the channels the mask was broadcast to
        grad_mask = grad_mask.sum(1, keepdim=True)
    if len(prev_size) != 2:
        grad_prev = feat.new_empty(0)
    elif grad_out.numel() == 0:  # the forward added nothing from prev
        grad_prev = feat.new_zeros(feat.shape[0], feat.shape[1], *prev_size)
    else:
        grad_prev = torch.ops.aten.upsample_nearest2d_backward(
            grad_out, list(grad_out.shape[2:]), [feat.shape[0], feat.shape[1], *prev_size])
    return grad_feat, grad_mask, grad_prev


# ---------------------------------------------------------------------------------------
# gumbel_binarize: the random stream, written in plain PyTorch so the test oracle and the
# fallback path produce exactly the bits the C++/CUDA (csrc/philox.h) and Triton kernels do.
# uint32 arithmetic is emulated in int64 tensors (values kept in [0, 2**32)).
# ---------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers (Random123)
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments


def _mulhilo32(a, b):
    """(hi, lo) 32-bit words of the 64-bit product of uint32 a (tensor) and b (constant),
    from 16-bit halves so no partial product leaves int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi  # < 2**33
    lo = a_lo * b_lo + ((mid & 0xFFFF) << 16)  # < 2**33
    hi = a_hi * b_hi + (mid >> 16) + (lo >> 32)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32_R with R = 10).

    c0..c3: int64 tensors of counter words, k0, k1: Python ints (key words), all uint32
    values. Returns the four output words as int64 tensors in [0, 2**32)."""
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_stream(numel, seed, offset, device="cpu"):
    """The uint32 random word of stream positions offset .. offset + numel - 1 (int64 tensor).

    Mapping (the same as csrc/philox.h): key = (low, high) 32-bit words of seed as uint64;
    position n (uint64, wrapping) is word n % 4 of the Philox block whose counter is
    (low 32 bits of n // 4, high 32 bits of n // 4, 0, 0)."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    first_block = offset >> 2
    lead = offset & 3
    blocks = (lead + numel + 3) // 4
    # offset < 2**63, so block indices stay below 2**62 and fit int64 without wrapping.
    block = first_block + torch.arange(blocks, dtype=torch.int64, device=device)
    c0 = block & _MASK32
    c1 = (block >> 32) & _MASK32
    zero = torch.zeros_like(c0)
    words = torch.stack(philox4x32_10(c0, c1, zero, zero, k0, k1), dim=1).reshape(-1)
    return words[lead:lead + numel]


def _f32(value):
    """value rounded to float32 (as a Python float), so tensor arithmetic with it is the
    float32 arithmetic the kernels do."""
    return struct.unpack("f", struct.pack("f", value))[0]


# Cephes logf (S. Moshier) coefficients, float32: log(1 + x) = x - x^2/2 + x^3 P(x) on
# sqrt(1/2) <= 1 + x < sqrt(2).
LOG_POLY = tuple(_f32(c) for c in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
))
LOG_SQRT_HALF = _f32(0.70710677)  # float32 sqrt(1/2)
LOG_LN2_HI, LOG_LN2_LO = _f32(0.693359375), _f32(-2.12194440e-4)  # ln 2 split; the high part is exact


def portable_log(x):
    """Natural log of a positive normal float32 tensor using only IEEE-exact float32 +, -, *
    (no libm), step by step in the order csrc/philox.h and the Triton kernel use, so every
    backend gets the same bits (the C++ range reduction picks m or 2m on the mantissa bits:
    the same exact values). Accuracy: within 2 ulp of log."""
    bits = x.view(torch.int32)
    e = (bits >> 23) - 126  # x = m * 2**e with m in [0.5, 1)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = m < LOG_SQRT_HALF
    e = e - small.to(torch.int32)
    m = torch.where(small, m + m, m) - 1.0  # exact (Sterbenz): now sqrt(1/2) - 1 <= m < sqrt(2) - 1
    z = m * m
    p = torch.full_like(m, LOG_POLY[0])
    for c in LOG_POLY[1:]:
        p = p * m + c
    y = (p * m) * z
    fe = e.to(torch.float32)
    y = y + fe * LOG_LN2_LO
    y = y + z * -0.5
    r = m + y
    return r + fe * LOG_LN2_HI


def logistic_noise(numel, seed, offset, device="cpu"):
    """Standard logistic noise log(u) - log(1 - u) of stream positions offset .., float32.

    u = (2k + 1) / 2**24 with k the top 23 bits of the Philox word, so u and 1 - u are both
    exact float32 values in [2**-24, 1 - 2**-24] (strictly inside (0, 1), noise finite,
    |noise| <= 16.64); noise = log(u / (1 - u)) with one correctly rounded division and
    portable_log."""
    k = philox_stream(numel, seed, offset, device) >> 9
    num = (2 * k + 1).to(torch.float32)
    den = ((1 << 24) - 2 * k - 1).to(torch.float32)
    return portable_log(num / den)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noise_like(logits, seed, offset):
    """Noise for every element of logits, indexed by its row-major (logical) position, so
    the mask does not depend on the memory layout."""
    noise = logistic_noise(logits.numel(), int(seed), int(offset), logits.device)
    return noise.reshape(logits.shape).to(_opmath(logits.dtype))


def gumbel_binarize(logits, temperature, training, seed, offset):
    """Hard forward value of binary Gumbel-softmax (straight-through estimator).

    training: hard = 1 where logits + noise >= 0 (noise = logistic_noise at positions
    offset + row-major index, keyed by seed, a 0-d int64 tensor), else 0; evaluation:
    hard = (logits >= 0). Computed in float32 (float64 for float64 logits), so the
    comparison is exact; NaN logits give 0. temperature does not change the hard value."""
    a = logits.to(_opmath(logits.dtype))
    if training:
        a = a + _noise_like(logits, seed, offset)
    out = (a >= 0).to(logits.dtype)
    return out.contiguous(memory_format=memory_format_of(logits))


def straight_through_argument(logits, temperature, training, seed, offset):
    """(logits + noise) / temperature in float32 (float64 for float64 logits): soft is its
    sigmoid. No noise in evaluation."""
    a = logits.to(_opmath(logits.dtype))
    if training:
        a = a + _noise_like(logits, seed, offset)
    return a / temperature


def gumbel_binarize_backward(grad_out, logits, temperature, training, seed, offset):
    """Straight-through gradient: grad_out * soft * (1 - soft) / temperature with
    soft = sigmoid((logits + noise) / temperature), the noise recomputed from (seed, offset)
    (no noise in evaluation)."""
    soft = torch.sigmoid(straight_through_argument(logits, temperature, training, seed, offset))
    grad = grad_out.to(soft.dtype) * (soft * (1 - soft) / temperature)
    return grad.to(logits.dtype).contiguous(memory_format=memory_format_of(logits))


class _GumbelStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(logits, temperature, training, seed, offset):
        return gumbel_binarize(logits, temperature, training, seed, offset)

    @staticmethod
    def setup_context(ctx, inputs, output):  # a separate setup_context: torch.func needs it
        logits, temperature, training, seed, offset = inputs
        ctx.save_for_backward(logits, seed)
        ctx.temperature, ctx.training, ctx.offset = temperature, training, offset

    @staticmethod
    def backward(ctx, grad_out):
        logits, seed = ctx.saved_tensors
        grad = gumbel_binarize_backward(grad_out, logits, ctx.temperature, ctx.training, seed, ctx.offset)
        return grad, None, None, None, None


def gumbel_binarize_straight_through(logits, temperature, training, seed, offset):
    """gumbel_binarize with its straight-through gradient (gumbel_binarize_backward) as one
    differentiable plain-PyTorch function: the reference path of a model."""
    return _GumbelStraightThrough.apply(logits, temperature, training, seed, offset)


def masked_conv2d(x, weight, bias, mask, prev=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """topdown_merge(conv2d(x, weight, bias, ...), mask, prev): the dense composition that the
    sparse kernels, which evaluate the convolution only where mask != 0, must reproduce."""
    return topdown_merge(F.conv2d(x, weight, bias, stride, padding, dilation, groups), mask, prev)
