"""masked_conv2d: topdown_merge(conv2d(x, weight, bias), mask, prev) with the convolution
evaluated only where mask != 0 (sparse inference of AIM's lateral convolutions)."""
import torch
import torch.nn.functional as F

from aim_kernels import reference
from aim_kernels._checks import check_same_dtype_device, check_tensor
from aim_kernels._cuda_backend import register_triton_impl
from aim_kernels._library import define, memory_format_of

_forward = define(
    "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor mask, Tensor? prev, int[2] stride, int[2] padding,"
    " int[2] dilation, int groups) -> Tensor",
    reference.masked_conv2d,
)
register_triton_impl("masked_conv2d", "aim_kernels.triton.masked_conv2d", "masked_conv2d")


def masked_conv2d(x, weight, bias, mask, prev=None, *, stride=1, padding=0, dilation=1, groups=1):
    """``topdown_merge(F.conv2d(x, weight, bias, stride, padding, dilation, groups), mask, prev)``,
    with the convolution computed only at output positions where ``mask != 0``.

    Args:
        x: (N, C_in, H, W), float32/float16/bfloat16/float64, NCHW or channels_last.
        weight: (C_out, C_in, kh, kw) for groups=1, or (C, 1, kh, kw) depthwise (groups == C_in == C_out);
            any kernel size.
        bias: (C_out,) or None.
        mask: (N, 1, H_out, W_out), any values: where nonzero the convolution is multiplied by it
            (so a non-binary mask still gives the dense result); where zero the output is exactly
            the upsampled prev (or 0).
        prev: optional (N, C_out, h, w), h <= H_out and w <= W_out, nearest-upsampled as in
            topdown_merge.
        stride, padding, dilation: int or pair, as in F.conv2d.

    Returns:
        (N, C_out, H_out, W_out) in x's memory layout. Above a measured active fraction the
        dense composition runs (see csrc/masked_conv2d.h). Differentiable in every tensor;
        the backward is the dense composite one (conv2d and topdown_merge backward), built
        for correctness, not speed.
    """
    if torch.overrides.has_torch_function_variadic(x, weight, bias, mask, prev):  # FX proxies: a leaf call
        return torch.overrides.handle_torch_function(masked_conv2d, (x, weight, bias, mask, prev), x, weight, bias, mask, prev,
                                                     stride=stride, padding=padding, dilation=dilation, groups=groups)
    stride, padding, dilation = (_pair(name, v, low) for name, v, low in
                                 (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)))
    validate(x, weight, bias, mask, prev, stride, padding, dilation, groups)
    return _forward(x, weight, bias, mask, prev, stride, padding, dilation, groups)


def _pair(name, value, low):
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return list(pair)


def output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def validate(x, weight, bias, mask, prev, stride, padding, dilation, groups):
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_tensor("mask", mask, ndim=4)
    check_same_dtype_device("x", x, weight=weight, mask=mask)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same_dtype_device("x", x, bias=bias)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    if groups != 1 and not (groups == c_in == c_out and weight.shape[1] == 1):
        raise ValueError(f"groups must be 1 or depthwise (groups == C_in == C_out, weight (C, 1, kh, kw)); got groups={groups} "
                         f"with x of {c_in} channels and weight {tuple(weight.shape)}")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"weight has {weight.shape[1]} input channels per group but x has {c_in} channels "
                         f"(groups={groups}): weight {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias must have {c_out} entries (weight's output channels), got {tuple(bias.shape)}")
    h_out, w_out = (output_size(size, k, s, p, d) for size, k, s, p, d in
                    zip((h, w), weight.shape[2:], stride, padding, dilation))
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"x is {h}x{w}, smaller than the dilated kernel {tuple(weight.shape[2:])} with padding {padding}")
    if tuple(mask.shape) != (n, 1, h_out, w_out):
        raise ValueError(f"mask must be ({n}, 1, {h_out}, {w_out}) (the output size for stride {stride}, padding {padding}, "
                         f"dilation {dilation}), got {tuple(mask.shape)}")
    if prev is None:
        return
    check_tensor("prev", prev, ndim=4)
    check_same_dtype_device("x", x, prev=prev)
    if prev.shape[0] != n or prev.shape[1] != c_out:
        raise ValueError(f"prev must have batch {n} and {c_out} channels (the output's), got shape {tuple(prev.shape)}")
    if prev.shape[2] > h_out or prev.shape[3] > w_out:
        raise ValueError(f"prev must not be larger than the output ({h_out}x{w_out}), got {prev.shape[2]}x{prev.shape[3]}")
    if prev.shape[2] == 0 or prev.shape[3] == 0:
        raise ValueError(f"prev has an empty spatial size {tuple(prev.shape[2:])}: nothing to upsample from")


@torch.library.register_fake("aim_kernels::masked_conv2d")
def _(x, weight, bias, mask, prev, stride, padding, dilation, groups):
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    torch._check(weight.shape[1] * groups == c_in, lambda: "masked_conv2d: weight does not match x's channels")
    h_out, w_out = (output_size(size, k, s, p, d) for size, k, s, p, d in
                    zip((h, w), weight.shape[2:], stride, padding, dilation))
    torch._check(mask.shape[0] == n and mask.shape[1] == 1 and mask.shape[2] == h_out and mask.shape[3] == w_out,
                 lambda: f"masked_conv2d: mask must be ({n}, 1, {h_out}, {w_out}), got {tuple(mask.shape)}")
    if prev is not None:
        torch._check(prev.shape[0] == n and prev.shape[1] == c_out and prev.shape[2] <= h_out and prev.shape[3] <= w_out,
                     lambda: f"masked_conv2d: prev {tuple(prev.shape)} does not fit the output ({n}, {c_out}, {h_out}, {w_out})")
    return x.new_empty((n, c_out, h_out, w_out)).contiguous(memory_format=memory_format_of(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, prev, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, bias, mask)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.prev_size = [] if prev is None else list(prev.shape[2:])


def _backward_rule(ctx, grad_out):
    """Dense composite backward: conv2d's and topdown_merge's, through their own ops."""
    x, weight, bias, mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    needs_x, needs_weight, needs_bias, needs_mask, needs_prev = ctx.needs_input_grad[:5]
    needs_conv = needs_x or needs_weight or needs_bias
    # topdown_merge_backward's gradients take grad_out's layout: the forward output's.
    fmt = memory_format_of(x)
    grad_out = grad_out.contiguous(memory_format=fmt)
    # The convolution's output enters only the mask's gradient: recomputed (densely) only for it.
    conv = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(memory_format=fmt) if needs_mask else None
    grad_conv, grad_mask, grad_prev = torch.ops.aim_kernels.topdown_merge_backward(
        grad_out, conv, mask if needs_conv else None, mask.shape[1], ctx.prev_size if needs_prev else [])
    grad_x = grad_weight = grad_bias = None
    if needs_conv:
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_conv, x, weight, None if bias is None else [bias.shape[0]], stride, padding, dilation, False, [0, 0],
            groups, [needs_x, needs_weight, needs_bias and bias is not None])
    return (grad_x, grad_weight, grad_bias, grad_mask if needs_mask else None,
            grad_prev if needs_prev and ctx.prev_size else None, None, None, None, None)


torch.library.register_autograd("aim_kernels::masked_conv2d", _backward_rule, setup_context=_setup_context)
