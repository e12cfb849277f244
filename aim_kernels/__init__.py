"""aim-kernels: fused kernels for the AIM top-down masking pathway.

Ops (each a torch custom op in the ``aim_kernels`` namespace, with autograd, fake
kernels for torch.compile, and a plain-PyTorch fallback):

- :func:`topdown_merge` -- feat * mask + nearest-upsample(prev)
- :func:`gumbel_binarize` -- binary Gumbel straight-through mask, in-kernel Philox noise

Plain PyTorch: :func:`mask_loss` -- the paper's per-stage (r - tau)^2 mask loss.
"""
from aim_kernels import _library  # noqa: F401  (defines the namespace before _C registers kernels)
from aim_kernels.topdown_merge import topdown_merge
from aim_kernels.gumbel_binarize import gumbel_binarize
from aim_kernels.losses import mask_loss
from aim_kernels import _extension  # noqa: E402  (after the schemas: _C adds kernels to them)
from aim_kernels._backends import backends
from aim_kernels import reference

__all__ = ["topdown_merge", "gumbel_binarize", "mask_loss", "backends", "reference"]
