"""aim-kernels: fused kernels for the AIM top-down masking pathway.

Ops (each a torch custom op in the ``aim_kernels`` namespace, with autograd, fake
kernels for torch.compile, and a plain-PyTorch fallback):

- :func:`topdown_merge` -- feat * mask + nearest-upsample(prev)
- :func:`gumbel_binarize` -- binary Gumbel straight-through mask, in-kernel Philox noise
- :func:`masked_conv2d` -- topdown_merge(conv2d(x), mask, prev), the conv only where mask != 0

Plain PyTorch: :func:`mask_loss` -- the paper's per-stage (r - tau)^2 mask loss.
"""
from aim_kernels import _library  # noqa: F401  (defines the namespace before _C registers kernels)
from aim_kernels.topdown_merge import topdown_merge
from aim_kernels.gumbel_binarize import gumbel_binarize
from aim_kernels.masked_conv2d import masked_conv2d
from aim_kernels.losses import mask_loss
from aim_kernels import _extension  # noqa: E402  (after the schemas: _C adds kernels to them)
from aim_kernels._backends import backends
from aim_kernels._cuda_backend import get_cuda_backend, set_cuda_backend, select_at_import as _select_cuda_backend
from aim_kernels import reference

_select_cuda_backend()  # after every op module has declared its Triton launchers

__all__ = ["topdown_merge", "gumbel_binarize", "masked_conv2d", "mask_loss", "backends", "get_cuda_backend", "set_cuda_backend", "reference"]
