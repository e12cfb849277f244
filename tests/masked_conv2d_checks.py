"""The cases of masked_conv2d's tests and the check against the dense composition
topdown_merge(conv2d(x), mask, prev).

Tolerance (where mask != 0), from how the two sides round. Each output is a dot product of
L = kh * kw * C_in / groups products plus the bias; with S = sum of |x * w| + |b| (the dense
convolution of |x| and |w|, in float64):
- each side's accumulation (float32 for the half types, float64 for float64) is within
  gamma_{L+1} * S of the exact sum, gamma_n = n u_acc / (1 - n u_acc) (Higham, Thm. 3.1),
  and rounding the convolution to the dtype adds u * S: the two convolutions differ by at
  most 2 (gamma_{L+1} + u) S;
- that difference is multiplied by |mask|, and each side's merge (product, then sum) rounds
  within 2u (|conv * mask| + |prev|): 4u (|mask| S + |prev|) for both.
Where mask == 0 the output must be exactly the upsampled prev (or 0): torch.equal.
"""
import torch
import torch.nn.functional as F

from aim_kernels import reference
from merge_checks import UNIT_ROUNDOFF

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
FORCE_SPARSE = "AIM_KERNELS_MASKED_CONV_DENSE_ABOVE"  # "2": never the dense path; "0": always

# (label, C_in, C_out, (kh, kw), stride, padding, dilation, groups)
CONVS = [
    ("1x1", 5, 7, (1, 1), 1, 0, 1, 1),
    ("3x3", 5, 7, (3, 3), 1, 1, 1, 1),
    ("3x3/s2", 5, 7, (3, 3), 2, 1, 1, 1),
    ("3x3/d2", 5, 7, (3, 3), 1, 2, 2, 1),
    ("2x3", 4, 6, (2, 3), (2, 1), (0, 1), 1, 1),
    ("dw7x7", 6, 6, (7, 7), 1, 3, 1, 6),
    ("dw3x3/s2", 6, 6, (3, 3), 2, 1, 1, 6),
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_inputs(conv, dtype, layout, n=2, hw=(9, 11), density=0.3, prev_ratio="x2", bias=True, seed=0):
    _, c_in, c_out, k, stride, padding, dilation, groups = conv
    g = torch.Generator().manual_seed(seed)
    fmt = LAYOUTS[layout]
    x = torch.randn(n, c_in, *hw, generator=g).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(c_out, c_in // groups, *k, generator=g).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype) if bias else None
    ho, wo = F.conv2d(torch.empty(1, c_in, *hw), torch.empty(c_out, c_in // groups, *k), None, stride, padding, dilation, groups).shape[2:]
    # any float values where active (the op multiplies by them), exact zeros elsewhere
    keep = torch.rand(n, 1, ho, wo, generator=g) < density
    mask = (keep * (torch.rand(n, 1, ho, wo, generator=g) + 0.5)).to(dtype)
    prev = None
    if prev_ratio is not None:
        size = {"x2": ((ho + 1) // 2, (wo + 1) // 2), "odd": (max(1, ho * 2 // 5), max(1, wo // 3))}[prev_ratio]
        prev = torch.randn(n, c_out, *size, generator=g).to(dtype).contiguous(memory_format=fmt)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, mask, prev, kwargs


def dense(x, w, b, mask, prev, kwargs):
    return reference.masked_conv2d(x, w, b, mask, prev, pair(kwargs["stride"]), pair(kwargs["padding"]),
                                   pair(kwargs["dilation"]), kwargs["groups"])


def check_against_dense(out, x, w, b, mask, prev, kwargs, truncating_bfloat16=False):
    """truncating_bfloat16: Triton's interpreter rounds float32 to bfloat16 by truncation (see
    merge_checks), up to one more ulp at each of the two roundings to the dtype."""
    expected = dense(x, w, b, mask, prev, kwargs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    inactive = (mask == 0).expand_as(out)
    upsampled = reference.topdown_merge(torch.zeros_like(expected), torch.zeros_like(mask), prev)
    assert torch.equal(out[inactive], upsampled[inactive]), "inactive positions differ from the upsampled prev"
    u = UNIT_ROUNDOFF[x.dtype]
    u_acc = UNIT_ROUNDOFF[torch.float64 if x.dtype == torch.float64 else torch.float32]
    terms = w[0].numel() + 1
    gamma = terms * u_acc / (1 - terms * u_acc)
    d = {k: pair(v) if k != "groups" else v for k, v in kwargs.items()}
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), **d)
    m = mask.double().abs()
    p = upsampled.double().abs()
    bound = m * 2 * (gamma + u) * magnitude + 4 * u * (m * magnitude + p) + torch.finfo(x.dtype).tiny
    if truncating_bfloat16 and x.dtype == torch.bfloat16:
        bound = bound + 4 * u * (m * magnitude + p)
    diff = (out.double() - expected.double()).abs()
    bad = diff > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outside the bound; worst excess "
                           f"{(diff - bound).max().item():.3g} at {tuple(bad.nonzero()[0].tolist())}")
