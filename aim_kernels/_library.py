"""The aim_kernels torch.library namespace: every op's schema is defined here, once.

Compiled kernels (aim_kernels._C) add CPU and CUDA implementations with
TORCH_LIBRARY_IMPL; the plain-PyTorch reference is registered as the
CompositeExplicitAutograd kernel, which the dispatcher uses only for a device that has
no backend kernel (e.g. when _C failed to build).
"""
import torch

lib = torch.library.Library("aim_kernels", "DEF")


def define(schema, reference_impl):
    """Define an op from its schema and register its plain-PyTorch fallback kernel."""
    lib.define(schema)
    name = schema.split("(", 1)[0]
    lib.impl(name, reference_impl, "CompositeExplicitAutograd")
    return getattr(torch.ops.aim_kernels, name).default


def memory_format_of(t):
    """The layout an op's output takes from its main input: channels_last only when the
    input is channels_last-dense and not also plain-contiguous (the C++ kernels use the
    same rule, so fake and real outputs have the same strides)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def has_backend_kernel(op, dispatch_key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), dispatch_key)
