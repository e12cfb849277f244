"""topdown_merge: out = feat * mask + nearest_upsample(prev), fused, forward and backward.

Autograd (any order), torch.func (grad, vjp, jacrev, vmap), autocast, torch.compile/export
(fake kernels) and FX (the public function is a leaf, like torch.nn.functional's) are all
handled here; the kernels themselves live in csrc/ and aim_kernels/triton/.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from aim_kernels import reference
from aim_kernels._checks import check_same_dtype_device, check_tensor
from aim_kernels._cuda_backend import register_triton_impl
from aim_kernels._library import (apply, call_below_autograd, define, memory_format_of, register_autocast,
                                  register_function, with_eager_variant)


def _fallback_forward(feat, mask, prev):
    return reference.topdown_merge(feat, mask, prev).contiguous(memory_format=memory_format_of(feat))


def _fallback_backward(grad_out, feat, mask, mask_channels, prev_size):
    n, c, h, w = grad_out.shape
    zeros = grad_out.new_zeros(())
    grads = reference.topdown_merge_backward(grad_out, zeros.expand(n, c, h, w) if feat is None else feat,
                                             zeros.expand(n, mask_channels, h, w) if mask is None else mask, prev_size)
    fmt = memory_format_of(grad_out)
    wanted = (mask is not None, feat is not None, len(prev_size) == 2)
    return tuple(g.contiguous(memory_format=fmt) if want else grad_out.new_empty(0) for g, want in zip(grads, wanted))


_forward = define("topdown_merge(Tensor feat, Tensor mask, Tensor? prev) -> Tensor", _fallback_forward)
# Each gradient is computed only when its ingredient is passed: grad_feat = grad_out * mask
# needs mask, grad_mask (N, mask_channels, H, W) = grad_out * feat summed over broadcast
# channels needs feat, grad_prev needs prev_size = [h, w]. One not asked for comes back as an
# empty tensor. All three take grad_out's layout (the autograd rule passes grad_out in the
# forward output's layout).
_backward = define(
    "topdown_merge_backward(Tensor grad_out, Tensor? feat, Tensor? mask, SymInt mask_channels, SymInt[] prev_size)"
    " -> (Tensor grad_feat, Tensor grad_mask, Tensor grad_prev)",
    _fallback_backward,
)
register_triton_impl("topdown_merge", "aim_kernels.triton.topdown_merge", "topdown_merge")
register_triton_impl("topdown_merge_backward", "aim_kernels.triton.topdown_merge", "topdown_merge_backward")


def topdown_merge(feat: Tensor, mask: Tensor, prev: Optional[Tensor] = None) -> Tensor:
    """Fused AIM top-down step: ``feat * mask + F.interpolate(prev, size=feat.shape[-2:], mode="nearest")``.

    Args:
        feat: (N, C, H, W) features, float32/float16/bfloat16/float64, NCHW or channels_last.
        mask: (N, 1, H, W), broadcast over channels, or (N, C, H, W); same dtype and device
            (under autocast, the inputs are promoted to a common dtype, as eager PyTorch does).
        prev: optional (N, C, h, w) coarser top-down sum with h <= H and w <= W, any ratio
            (F.interpolate's nearest index rule exactly).

    Returns:
        (N, C, H, W) in feat's memory layout. Differentiable in all three inputs, to any order.
    """
    if torch.overrides.has_torch_function_variadic(feat, mask, prev):  # FX proxies: a leaf call
        return torch.overrides.handle_torch_function(topdown_merge, (feat, mask, prev), feat, mask, prev)
    autocast = isinstance(feat, Tensor) and torch.is_autocast_enabled(feat.device.type)
    validate(feat, mask, prev, same_dtype=not autocast)
    if torch.compiler.is_compiling():
        # The op itself: torch.compile traces ops (its autocast rule promotes, its Autograd
        # kernel is _Merge.eager), not the Function's dispatcher guard.
        return _forward(feat, mask, prev)
    if autocast:
        # The op's autocast rule, applied here so that the Function below records the graph:
        # under torch.func the op's own Autograd kernel (no setup_context) cannot.
        feat, mask, prev = _promote(feat, mask, prev)
    if not (torch.is_grad_enabled() and torch._C._any_requires_grad(feat, mask, prev)):
        return call_below_autograd(_forward, feat, mask, prev)  # no graph to record: skip the Function
    return apply(_Merge, feat, mask, prev)


def validate(feat, mask, prev, same_dtype=True):
    check_tensor("feat", feat, ndim=4)
    check_tensor("mask", mask, ndim=4)
    check_same_dtype_device("feat", feat, same_dtype, mask=mask)
    n, c, h, w = feat.shape
    if mask.shape[0] != n or mask.shape[2:] != feat.shape[2:]:
        raise ValueError(f"mask must have shape ({n}, 1 or {c}, {h}, {w}) to match feat, got {tuple(mask.shape)}")
    if mask.shape[1] not in (1, c):
        raise ValueError(f"mask must have 1 channel (broadcast) or {c} channels like feat, got {mask.shape[1]}")
    if prev is None:
        return
    check_tensor("prev", prev, ndim=4)
    check_same_dtype_device("feat", feat, same_dtype, prev=prev)
    if prev.shape[0] != n or prev.shape[1] != c:
        raise ValueError(f"prev must have batch {n} and {c} channels like feat, got shape {tuple(prev.shape)}")
    if prev.shape[2] > h or prev.shape[3] > w:
        raise ValueError(f"prev must not be larger than feat spatially ({h}x{w}), got {prev.shape[2]}x{prev.shape[3]}")
    if prev.shape[2] == 0 or prev.shape[3] == 0:
        if h * w > 0:
            raise ValueError(f"prev has an empty spatial size {tuple(prev.shape[2:])} but feat is {h}x{w}: nothing to upsample from")


# ---- fake kernels: the C++ checks (csrc/topdown_merge.h), as torch._check ----------------

def _check_same(name, t, ref):
    torch._check(t.dtype == ref.dtype, lambda: f"topdown_merge: {name} dtype {t.dtype} != {ref.dtype}")
    torch._check(t.device == ref.device, lambda: f"topdown_merge: {name} is on {t.device}, not {ref.device}")


def _check_fake_inputs(feat, mask, prev):
    torch._check(feat.dim() == 4 and mask.dim() == 4, lambda: "topdown_merge: feat and mask must be 4-D")
    torch._check(feat.dtype.is_floating_point, lambda: f"topdown_merge: feat must be floating point, got {feat.dtype}")
    _check_same("mask", mask, feat)
    n, c, h, w = feat.shape
    torch._check(mask.shape[0] == n and mask.shape[2] == h and mask.shape[3] == w and (mask.shape[1] == 1 or mask.shape[1] == c),
                 lambda: f"topdown_merge: mask must be (N, 1 or C, H, W) matching feat {tuple(feat.shape)}, got {tuple(mask.shape)}")
    if prev is not None:
        _check_same("prev", prev, feat)
        torch._check(prev.dim() == 4 and prev.shape[0] == n and prev.shape[1] == c,
                     lambda: f"topdown_merge: prev must be (N, C, h, w) matching feat {tuple(feat.shape)}, got {tuple(prev.shape)}")
        torch._check(prev.shape[2] <= h and prev.shape[3] <= w,
                     lambda: f"topdown_merge: prev {tuple(prev.shape)} must not be larger than feat {tuple(feat.shape)}")
        torch._check(h * w == 0 or prev.shape[2] * prev.shape[3] > 0, lambda: "topdown_merge: prev has an empty spatial size")


@torch.library.register_fake("aim_kernels::topdown_merge")
def _(feat, mask, prev):
    _check_fake_inputs(feat, mask, prev)
    return torch.empty_like(feat, memory_format=memory_format_of(feat))


@torch.library.register_fake("aim_kernels::topdown_merge_backward")
def _(grad_out, feat, mask, mask_channels, prev_size):
    torch._check(grad_out.dim() == 4, lambda: f"topdown_merge_backward: grad_out must be 4-D, got {tuple(grad_out.shape)}")
    n, c, h, w = grad_out.shape
    for name, t in (("feat", feat), ("mask", mask)):
        if t is not None:
            _check_same(name, t, grad_out)
    if feat is not None:
        torch._check(feat.shape == grad_out.shape, lambda: f"topdown_merge_backward: feat {tuple(feat.shape)} != grad_out {tuple(grad_out.shape)}")
    torch._check(mask_channels == 1 or mask_channels == c, lambda: f"topdown_merge_backward: mask_channels must be 1 or {c}")
    if mask is not None:
        torch._check(tuple(mask.shape) == (n, mask_channels, h, w), lambda: f"topdown_merge_backward: mask {tuple(mask.shape)} must be {(n, mask_channels, h, w)}")
    torch._check(len(prev_size) in (0, 2), lambda: "topdown_merge_backward: prev_size must be [] or [h, w]")
    if len(prev_size) == 2:
        torch._check(0 <= prev_size[0] <= h and 0 <= prev_size[1] <= w and (h * w == 0 or prev_size[0] * prev_size[1] > 0),
                     lambda: f"topdown_merge_backward: invalid prev_size {list(prev_size)}")
    fmt = memory_format_of(grad_out)
    empty = lambda: grad_out.new_empty(0)  # noqa: E731  (one each: outputs must not alias)
    grad_feat = empty() if mask is None else torch.empty_like(grad_out, memory_format=fmt)
    grad_mask = empty() if feat is None else grad_out.new_empty((n, mask_channels, h, w)).contiguous(memory_format=fmt)
    grad_prev = empty() if len(prev_size) != 2 else grad_out.new_empty((n, c, *prev_size)).contiguous(memory_format=fmt)
    return grad_feat, grad_mask, grad_prev


# ---- autograd ----------------------------------------------------------------------------

@with_eager_variant
class _Merge(torch.autograd.Function):
    generate_vmap_rule = True  # vmap runs forward and backward through the ops' batching rules below

    @staticmethod
    def forward(feat, mask, prev):
        return call_below_autograd(_forward, feat, mask, prev)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feat, mask, prev = inputs
        need_feat, need_mask, need_prev = ctx.needs_input_grad
        # grad_feat needs mask and grad_mask needs feat: save only those.
        ctx.save_for_backward(feat if need_mask else None, mask if need_feat else None)
        ctx.mask_channels = mask.shape[1]
        ctx.prev_size = list(prev.shape[2:]) if need_prev else []
        ctx.out_format = memory_format_of(feat)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None
        feat, mask = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=ctx.out_format)
        args = (grad_out, feat, mask, ctx.mask_channels, ctx.prev_size)
        if torch.is_grad_enabled():  # create_graph: record the backward op, for a higher derivative
            grad_feat, grad_mask, grad_prev = apply(_MergeBackward, *args)
        else:
            grad_feat, grad_mask, grad_prev = call_below_autograd(_backward, *args)
        return (grad_feat if mask is not None else None, grad_mask if feat is not None else None,
                grad_prev if ctx.prev_size else None)


def _broadcast_sum(t, channels):
    """t (N, C, H, W) summed over the channels a (N, channels, H, W) tensor was broadcast over."""
    return t.sum(1, keepdim=True) if channels == 1 and t.shape[1] != 1 else t


@with_eager_variant
class _MergeBackward(torch.autograd.Function):
    """The backward op, differentiable: it is linear in grad_out and in each of feat and mask,
    so its derivatives are the same products and sums, written in plain PyTorch ops (which
    are themselves differentiable, to any order)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, feat, mask, mask_channels, prev_size):
        return call_below_autograd(_backward, grad_out, feat, mask, mask_channels, prev_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, feat, mask, mask_channels, prev_size = inputs
        need_grad_out, need_feat, need_mask = ctx.needs_input_grad[:3]
        ctx.save_for_backward(grad_out if (need_feat or need_mask) else None,
                              feat if need_grad_out else None, mask if need_grad_out else None)
        ctx.mask_channels, ctx.prev_size = mask_channels, list(prev_size)
        ctx.out_size = grad_out.shape[-2:]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg_feat, gg_mask, gg_prev):
        grad_out, feat, mask = ctx.saved_tensors
        need_grad_out, need_feat, need_mask = ctx.needs_input_grad[:3]
        d_grad_out = d_feat = d_mask = None
        if need_grad_out:  # d/d grad_out of (grad_out * mask, sum(grad_out * feat), gather(grad_out))
            terms = []
            if gg_feat is not None and mask is not None:
                terms.append(gg_feat * mask)
            if gg_mask is not None and feat is not None:
                terms.append(gg_mask * feat)
            if gg_prev is not None and ctx.prev_size:
                terms.append(F.interpolate(gg_prev, size=ctx.out_size, mode="nearest"))
            d_grad_out = sum(terms[1:], terms[0]) if terms else None
        if need_feat and gg_mask is not None:
            d_feat = grad_out * gg_mask
        if need_mask and gg_feat is not None:
            d_mask = _broadcast_sum(grad_out * gg_feat, ctx.mask_channels)
        return d_grad_out, d_feat, d_mask, None, None


register_function(_forward, _Merge)
register_function(_backward, _MergeBackward)


# ---- autocast: promote to a common dtype, as eager feat * mask + interpolate(prev) would ----

def _promote(feat, mask, prev):
    dtype = torch.promote_types(feat.dtype, mask.dtype)
    if prev is not None:
        dtype = torch.promote_types(dtype, prev.dtype)
    return feat.to(dtype), mask.to(dtype), None if prev is None else prev.to(dtype)


for _device_type in ("cpu", "cuda"):
    register_autocast(_forward, _device_type, _promote)


# ---- vmap: the batch dimension folds into N ----------------------------------------------

def _fold(t, dim, batch_size):
    """(B, N, ...) with the batch at `dim` (None: not batched) -> (B * N, ...)."""
    t = t.expand(batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(batch_size * t.shape[1], *t.shape[2:])


def _unfold(t, batch_size):
    return t.reshape(batch_size, t.shape[0] // batch_size, *t.shape[1:])


@torch.library.register_vmap("aim_kernels::topdown_merge")
def _(info, in_dims, feat, mask, prev):
    b = info.batch_size
    prev = None if prev is None else _fold(prev, in_dims[2], b)
    return _unfold(_forward(_fold(feat, in_dims[0], b), _fold(mask, in_dims[1], b), prev), b), 0


@torch.library.register_vmap("aim_kernels::topdown_merge_backward")
def _(info, in_dims, grad_out, feat, mask, mask_channels, prev_size):
    b = info.batch_size
    feat, mask = (None if t is None else _fold(t, d, b) for t, d in ((feat, in_dims[1]), (mask, in_dims[2])))
    grads = _backward(_fold(grad_out, in_dims[0], b), feat, mask, mask_channels, prev_size)
    # Gradients not asked for are the same empty tensor for every sample: not batched.
    return tuple(g if g.dim() == 1 else _unfold(g, b) for g in grads), tuple(None if g.dim() == 1 else 0 for g in grads)
