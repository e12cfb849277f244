"""Tolerances for an elementwise result that a kernel computes in float32 (float64 for
float64) and rounds once to `dtype`, compared with the reference computed by other
(equally valid) float operations on the same inputs: each side is within about one unit in
the last place (ulp) of the exact value, so rtol is a few machine epsilons of `dtype`; atol
covers results near zero, where relative error says nothing.

(topdown_merge's comparisons are derived from its rounding analysis in merge_checks.py.)
"""
import torch

TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.2e-7 * 4, atol=1e-5),
    torch.float16: dict(rtol=9.8e-4, atol=2e-3),  # eps = 2**-10
    torch.bfloat16: dict(rtol=7.9e-3, atol=1.6e-2),  # eps = 2**-7
}

