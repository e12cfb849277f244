"""topdown_merge: out = feat * mask + nearest_upsample(prev), fused, forward and backward."""
import torch

from aim_kernels import reference
from aim_kernels._checks import check_same_dtype_device, check_tensor
from aim_kernels._cuda_backend import register_triton_impl
from aim_kernels._library import define, memory_format_of

_forward = define("topdown_merge(Tensor feat, Tensor mask, Tensor? prev) -> Tensor", reference.topdown_merge)
# prev_size is [h, w], or [] when the forward had no prev (grad_prev is then an empty tensor).
_backward = define(
    "topdown_merge_backward(Tensor grad_out, Tensor feat, Tensor mask, SymInt[] prev_size)"
    " -> (Tensor grad_feat, Tensor grad_mask, Tensor grad_prev)",
    reference.topdown_merge_backward,
)
register_triton_impl("topdown_merge", "aim_kernels.triton.topdown_merge", "topdown_merge")
register_triton_impl("topdown_merge_backward", "aim_kernels.triton.topdown_merge", "topdown_merge_backward")


def topdown_merge(feat, mask, prev=None):
    """Fused AIM top-down step: ``feat * mask + F.interpolate(prev, size=feat.shape[-2:], mode="nearest")``.

    Args:
        feat: (N, C, H, W) features, float32/float16/bfloat16/float64, NCHW or channels_last.
        mask: (N, 1, H, W), broadcast over channels, or (N, C, H, W); same dtype and device.
        prev: optional (N, C, h, w) coarser top-down sum with h <= H and w <= W, any ratio
            (F.interpolate's nearest index rule exactly).

    Returns:
        (N, C, H, W) in feat's memory layout. Differentiable in all three inputs.
    """
    validate(feat, mask, prev)
    return _forward(feat, mask, prev)


def validate(feat, mask, prev):
    check_tensor("feat", feat, ndim=4)
    check_tensor("mask", mask, ndim=4)
    check_same_dtype_device("feat", feat, mask=mask)
    n, c, h, w = feat.shape
    if mask.shape[0] != n or mask.shape[2:] != feat.shape[2:]:
        raise ValueError(f"mask must have shape ({n}, 1 or {c}, {h}, {w}) to match feat, got {tuple(mask.shape)}")
    if mask.shape[1] not in (1, c):
        raise ValueError(f"mask must have 1 channel (broadcast) or {c} channels like feat, got {mask.shape[1]}")
    if prev is None:
        return
    check_tensor("prev", prev, ndim=4)
    check_same_dtype_device("feat", feat, prev=prev)
    if prev.shape[0] != n or prev.shape[1] != c:
        raise ValueError(f"prev must have batch {n} and {c} channels like feat, got shape {tuple(prev.shape)}")
    if prev.shape[2] > h or prev.shape[3] > w:
        raise ValueError(f"prev must not be larger than feat spatially ({h}x{w}), got {prev.shape[2]}x{prev.shape[3]}")
    if prev.shape[2] == 0 or prev.shape[3] == 0:
        if h * w > 0:
            raise ValueError(f"prev has an empty spatial size {tuple(prev.shape[2:])} but feat is {h}x{w}: nothing to upsample from")


@torch.library.register_fake("aim_kernels::topdown_merge")
def _(feat, mask, prev):
    return torch.empty_like(feat, memory_format=memory_format_of(feat))


@torch.library.register_fake("aim_kernels::topdown_merge_backward")
def _(grad_out, feat, mask, prev_size):
    fmt = memory_format_of(feat)
    grad_feat = torch.empty_like(feat, memory_format=fmt)
    grad_mask = torch.empty_like(mask, memory_format=fmt)
    if len(prev_size) == 2:
        grad_prev = feat.new_empty((feat.shape[0], feat.shape[1], *prev_size)).contiguous(memory_format=fmt)
    else:
        grad_prev = feat.new_empty(0)
    return grad_feat, grad_mask, grad_prev


def _setup_context(ctx, inputs, output):
    feat, mask, prev = inputs
    ctx.save_for_backward(feat, mask)
    ctx.prev_size = [] if prev is None else list(prev.shape[2:])


def _backward_rule(ctx, grad_out):
    feat, mask = ctx.saved_tensors
    grad_feat, grad_mask, grad_prev = _backward(grad_out, feat, mask, ctx.prev_size)
    return grad_feat, grad_mask, (grad_prev if ctx.prev_size else None)


torch.library.register_autograd("aim_kernels::topdown_merge", _backward_rule, setup_context=_setup_context)
