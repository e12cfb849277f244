"""Inputs and checks the pathway's tests share: stage maps of odd sizes, a module whose mask
logits sit near the threshold, gradient comparison."""
from collections import OrderedDict

import torch

CHANNELS = [8, 12, 16, 24]
# Odd sizes on purpose: the top-down upsampling is not an exact x2 between these stages.
SIZES = [(23, 19), (12, 10), (6, 5), (3, 3)]


def stage_maps(batch=2, channels=CHANNELS, sizes=SIZES, requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (f"feat{i}", torch.randn(batch, c, h, w, generator=g, dtype=dtype).requires_grad_(requires_grad))
        for i, (c, (h, w)) in enumerate(zip(channels, sizes))
    )


def near_threshold(module):
    """Mask logits near 0 so a Gumbel sample differs visibly from the eval threshold."""
    for estimator in module.mask_estimators:
        torch.nn.init.zeros_(estimator.to_logit.bias)
    return module


def assert_gradients_close(fused, ref):
    """Gradients differ in the last float32 bits: the kernels sum grad_prev over upsampling
    footprints and evaluate the straight-through sigmoid in another order than autograd, and
    the conv weight gradients then sum thousands of such terms, so an entry whose sum cancels
    can be off relatively but never by more than a small fraction of the tensor's scale."""
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))
