"""Tolerances for comparing an op's output in `dtype` with the float64 reference on the same
(dtype-rounded) inputs, and why each is what it is.

The kernels compute in float32 (float64 for float64) and round the result once to `dtype`,
so an output may sit one unit in the last place (ulp) of `dtype` from the correctly rounded
float64 value: rtol = machine epsilon of the dtype. atol covers cancellation: a sum of O(1)
terms whose exact value is near zero carries the rounding error of its terms, not of itself;
for the float32 reductions (grad_mask over up to a few hundred channels, grad_prev over
footprints) that is a few hundred float32 roundings of O(1) terms.

Forward values in float32/float64 are not compared with a tolerance at all: they must be
bit-identical to the reference in the same dtype (one multiply, one add, no FMA).
"""
import torch

TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.2e-7 * 4, atol=1e-5),
    torch.float16: dict(rtol=9.8e-4, atol=2e-3),  # eps = 2**-10
    torch.bfloat16: dict(rtol=7.9e-3, atol=1.6e-2),  # eps = 2**-7
}


def assert_close_to_float64(actual, expected64, dtype=None):
    """actual (in its dtype) against a float64 oracle, with the dtype's tolerance; prints where
    they differ on failure (torch.testing does)."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected64.double(), **TOLERANCE[dtype])
