"""Triton kernels for masked_conv2d: topdown_merge(conv2d(x), mask, prev) with the
convolution evaluated only where mask != 0.

The launcher compacts the active positions (torch.nonzero of the mask), writes the upsampled
prev (or 0) everywhere with F.interpolate (the index rule itself), then one kernel computes the
convolution at the active positions only and merges on store:
- groups == 1: an implicit GEMM. A program owns BLOCK_M active positions x BLOCK_N output
  channels; for each kernel tap it gathers the BLOCK_M input pixels (rows of the implicit
  column matrix, zero outside the image: padding) BLOCK_K channels at a time and multiplies
  them with the weight tile by tl.dot (input_precision="ieee": no TF32, the dense result's
  accuracy), accumulating in float32 (float64 for float64);
- depthwise: the same gather, a multiply-add per channel (no reduction over channels).
The result is rounded to the dtype (the dense convolution's output), then out = conv * mask +
up(prev) in the accumulation type, rounded once more: topdown_merge's arithmetic.

Tensors are addressed through their (n, c, y, x) element strides, so NCHW and channels_last
take the same kernels (the output is in x's layout). Above the crossover density the dense
composition runs instead (see DENSE_ABOVE).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aim_kernels._library import memory_format_of
from aim_kernels.masked_conv2d import validate
from aim_kernels.triton.topdown_merge import LaunchPlan, acc_dtype, axis_tables

# Tile and warps per element size. float16/bfloat16 run tl.dot on tensor cores;
# float32 ("ieee", no TF32) and float64 on FMA units with the operands in registers, where a
# 64x64x32 tile of 8 warps spilled at 255 registers and ptxas's own choice or caps of 128/168
# left some 32x64x16 variants spilling 8-16 bytes; 32x32x16 on 4 warps fits every variant.
GEMM_CONFIGS = {
    2: (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 8),
    4: (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16), 4),
    8: (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16), 4),
}
DEPTHWISE_TILE = dict(BLOCK_M=32, BLOCK_C=64)
DEPTHWISE_NUM_WARPS = 8
# Measured on an H100 (benchmarks/gpu_masked_conv2d.py, results/gpu_masked_conv2d{,_b64}.json):
# at batch 8 the fused kernel beat its own dense composition (cuDNN + the Triton merge) only in
# rows where that dense call was slowed to 0.28-0.65 ms (launch noise; 6-25x the same shape's
# dense call with the C++ merge), and even there took 0.23-0.61 ms against the C++ backend's
# 0.025-0.039 ms dense call; at batch 64 it won only for depthwise 7x7 NCHW with 96 channels
# at 56x56 (1.06-1.39x at density <= 0.25) and lost every other row (0.08-0.84x). So 0: the
# dense composition at any density, chosen without counting the mask (no host sync).
# AIM_KERNELS_MASKED_CONV_DENSE_ABOVE overrides it, as for the C++ kernels.
DENSE_ABOVE = 0.0
FORCE_ENV = "AIM_KERNELS_MASKED_CONV_DENSE_ABOVE"


@triton.jit
def _active_rows(active_ptr, rows, R, HoWo, Wo, SH, SW, PH, PW):
    row_ok = rows < R
    pos = tl.load(active_ptr + rows, mask=row_ok, other=0)
    n = pos // HoWo
    pixel = pos - n * HoWo
    oy = pixel // Wo
    ox = pixel - oy * Wo
    return row_ok, n, oy, ox, oy * SH - PH, ox * SW - PW


@triton.jit
def _tap(t, KW, DH, DW, H, W, row_ok, n, iy0, ix0, sxn, sxy, sxx):
    """Rows whose tap t lies inside the image (outside: padding, read as 0) and the tap's
    offset in x, channel 0."""
    ky = t // KW
    kx = t - ky * KW
    iy = iy0 + ky * DH
    ix = ix0 + kx * DW
    inside = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return inside, n * sxn + iy.to(tl.int64) * sxy + ix.to(tl.int64) * sxx


@triton.jit
def _merge_store(out_ptr, prev_ptr, mask_ptr, src_y_ptr, src_x_ptr, conv, row_ok, n, oy, ox, ch, ch_ok, pos_mask,
                 HoWo, ws, son, soc, soy, sox, spn, spc, spy, spx, HAS_PREV: tl.constexpr, ACC: tl.constexpr):
    # conv: (rows, channels) in the accumulation type; rounded to the output dtype first, as the
    # dense convolution's output is, then merged in the accumulation type and rounded once.
    v = conv.to(out_ptr.dtype.element_ty).to(ACC)
    m = tl.load(mask_ptr + pos_mask, mask=row_ok, other=0).to(ACC)
    v = v * m[:, None]
    ok = row_ok[:, None] & ch_ok[None, :]
    if HAS_PREV:
        sy = tl.load(src_y_ptr + oy, mask=row_ok, other=0).to(tl.int64)
        sx = tl.load(src_x_ptr + ox, mask=row_ok, other=0).to(tl.int64)
        p_off = n * spn + sy * spy + sx * spx
        v = v + tl.load(prev_ptr + p_off[:, None] + ch[None, :].to(tl.int64) * spc, mask=ok, other=0).to(ACC)
    o_off = n * son + oy * soy + ox * sox
    tl.store(out_ptr + o_off[:, None] + ch[None, :].to(tl.int64) * soc, v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _masked_conv_gemm_kernel(
    out_ptr, x_ptr, w_ptr, bias_ptr, mask_ptr, prev_ptr, active_ptr, src_y_ptr, src_x_ptr,
    R, C, H, W, Cout, HoWo, Wo, ws, KW, TAPS,
    SH, SW, PH, PW, DH, DW,
    sxn, sxc, sxy, sxx, son, soc, soy, sox, spn, spc, spy, spx,
    HAS_BIAS: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, n, oy, ox, iy0, ix0 = _active_rows(active_ptr, rows, R, HoWo, Wo, SH, SW, PH, PW)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for t in range(0, TAPS):
        inside, base = _tap(t, KW, DH, DW, H, W, row_ok, n, iy0, ix0, sxn, sxy, sxx)
        for c0 in range(0, C, BLOCK_K):
            ci = c0 + tl.arange(0, BLOCK_K)
            ci_ok = ci < C
            a = tl.load(x_ptr + base[:, None] + ci[None, :].to(tl.int64) * sxc, mask=inside[:, None] & ci_ok[None, :], other=0)
            # weight as (TAPS * C, C_out): row t * C + ci
            b = tl.load(w_ptr + (t * C + ci)[:, None].to(tl.int64) * Cout + co[None, :], mask=ci_ok[:, None] & co_ok[None, :], other=0)
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0).to(ACC)[None, :]
    pos = tl.load(active_ptr + rows, mask=row_ok, other=0)
    _merge_store(out_ptr, prev_ptr, mask_ptr, src_y_ptr, src_x_ptr, acc, row_ok, n, oy, ox, co, co_ok, pos,
                 HoWo, ws, son, soc, soy, sox, spn, spc, spy, spx, HAS_PREV, ACC)


@triton.jit
def _masked_conv_depthwise_kernel(
    out_ptr, x_ptr, w_ptr, bias_ptr, mask_ptr, prev_ptr, active_ptr, src_y_ptr, src_x_ptr,
    R, C, H, W, HoWo, Wo, ws, KW, TAPS,
    SH, SW, PH, PW, DH, DW,
    sxn, sxc, sxy, sxx, son, soc, soy, sox, spn, spc, spy, spx,
    HAS_BIAS: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, n, oy, ox, iy0, ix0 = _active_rows(active_ptr, rows, R, HoWo, Wo, SH, SW, PH, PW)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0).to(ACC)[None, :]
    for t in range(0, TAPS):
        inside, base = _tap(t, KW, DH, DW, H, W, row_ok, n, iy0, ix0, sxn, sxy, sxx)
        xv = tl.load(x_ptr + base[:, None] + c[None, :].to(tl.int64) * sxc, mask=inside[:, None] & c_ok[None, :], other=0)
        wv = tl.load(w_ptr + t * C + c, mask=c_ok, other=0)  # weight as (TAPS, C)
        acc += xv.to(ACC) * wv.to(ACC)[None, :]
    pos = tl.load(active_ptr + rows, mask=row_ok, other=0)
    _merge_store(out_ptr, prev_ptr, mask_ptr, src_y_ptr, src_x_ptr, acc, row_ok, n, oy, ox, c, c_ok, pos,
                 HoWo, ws, son, soc, soy, sox, spn, spc, spy, spx, HAS_PREV, ACC)


def _nchw_strides(t):
    return tuple(t.stride())


def dense_above():
    forced = os.environ.get(FORCE_ENV)
    return float(forced) if forced else DENSE_ABOVE


def plan_masked_conv2d(x, weight, bias, mask, prev, stride, padding, dilation, groups):
    """(plan, out): out holds the upsampled prev (or 0) already; the plan (None when nothing is
    active) computes and merges the active positions. Arguments are the op's, validated."""
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = mask.shape[2:]
    if prev is not None:
        out = F.interpolate(prev, size=(ho, wo), mode="nearest").contiguous(memory_format=fmt)
    else:
        out = x.new_zeros((n, c_out, ho, wo)).contiguous(memory_format=fmt)
    if out.numel() == 0:
        return None, out
    active = torch.nonzero(mask.reshape(-1) != 0).reshape(-1)  # NaN counts as active, as in the dense result
    rows = active.numel()
    if rows == 0:
        return None, out
    mask_flat = mask.reshape(-1)
    has_prev = prev is not None
    if has_prev:
        src_y, _, _ = axis_tables(prev.shape[2], ho, x.device)
        src_x, _, _ = axis_tables(prev.shape[3], wo, x.device)
        prev_strides, ws = _nchw_strides(prev), prev.shape[3]
    else:  # never dereferenced: HAS_PREV=False compiles the prev path out
        prev, src_y, src_x, prev_strides, ws = out, active, active, (0, 0, 0, 0), 1
    geometry = [*stride, *padding, *dilation]
    common = dict(HAS_BIAS=bias is not None, HAS_PREV=has_prev, ACC=acc_dtype(x.dtype))
    bias_arg = bias if bias is not None else out
    if groups == 1:
        w_taps = weight.permute(2, 3, 1, 0).reshape(kh * kw * c, c_out).contiguous()  # row t * C + ci
        tile, num_warps = GEMM_CONFIGS[x.element_size()]
        grid = (triton.cdiv(rows, tile["BLOCK_M"]), triton.cdiv(c_out, tile["BLOCK_N"]))
        args = [out, x, w_taps, bias_arg, mask_flat, prev, active, src_y, src_x,
                rows, c, h, w, c_out, ho * wo, wo, ws, kw, kh * kw, *geometry,
                *_nchw_strides(x), *_nchw_strides(out), *prev_strides]
        return LaunchPlan(_masked_conv_gemm_kernel, grid, args, dict(common, **tile), num_warps), out
    w_taps = weight.reshape(c, kh * kw).t().contiguous()  # (TAPS, C)
    grid = (triton.cdiv(rows, DEPTHWISE_TILE["BLOCK_M"]), triton.cdiv(c, DEPTHWISE_TILE["BLOCK_C"]))
    args = [out, x, w_taps, bias_arg, mask_flat, prev, active, src_y, src_x,
            rows, c, h, w, ho * wo, wo, ws, kw, kh * kw, *geometry,
            *_nchw_strides(x), *_nchw_strides(out), *prev_strides]
    return LaunchPlan(_masked_conv_depthwise_kernel, grid, args, dict(common, **DEPTHWISE_TILE), DEPTHWISE_NUM_WARPS), out


def masked_conv2d(x, weight, bias, mask, prev, stride, padding, dilation, groups):
    """aim_kernels::masked_conv2d with Triton kernels (the dense composition above DENSE_ABOVE)."""
    validate(x, weight, bias, mask, prev, list(stride), list(padding), list(dilation), groups)
    threshold = dense_above()
    if threshold <= 0 or (mask.numel() and float((mask != 0).sum()) > threshold * mask.numel()):
        conv = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.ops.aim_kernels.topdown_merge(conv, mask, prev).contiguous(memory_format=memory_format_of(x))
    plan, out = plan_masked_conv2d(x, weight, bias, mask, prev, stride, padding, dilation, groups)
    if plan is not None:
        plan.run()
    return out
