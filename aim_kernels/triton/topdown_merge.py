"""Triton kernels for topdown_merge (forward and backward) and their launchers.

Same semantics as the C++ kernels: out = feat * mask + nearest_upsample(prev); mask (N,1,H,W)
broadcast or (N,C,H,W); NCHW or channels_last with the output in feat's layout; float32,
float16, bfloat16, float64, half types accumulated in float32; 64-bit offsets.

Both kernels address a tensor as (n, pixel, channel) with three element strides, so one
kernel serves both layouts: the pixel stride is 1 for NCHW, the channel stride is 1 for
channels_last, and Triton specializes a stride of 1 into a constant, which makes the
contiguous axis (and 128-bit vector access on it when the base is 16-byte aligned) visible
to the compiler.

Index rule: per-axis tables taken from F.interpolate itself (source index of every output
row/column, and where each source pixel's footprint begins), built once per size pair on the
CPU and cached per device. The forward gathers prev through them; the backward walks each
source pixel's footprint through them (a gather: no atomics, a fixed summation order).

Launchers take the op's arguments and return its outputs; `plan_forward`/`plan_backward`
expose the exact kernel arguments so tests can compile every configuration ahead of time.
fp32 must match the reference bit for bit, so kernels are compiled with enable_fp_fusion=False
(a fused multiply-add would round once where the reference rounds twice).
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aim_kernels._library import memory_format_of
from aim_kernels.topdown_merge import validate

# Backward tiles hold three inputs and their 64-bit addresses per element: 8 warps keep that
# near 100 registers per thread (4 warps needed up to ~220, i.e. 2 blocks per SM). Left to
# itself ptxas squeezed one sm_90 tile into 80 registers and spilled; a 128 cap lets it use
# what it needs (up to ~116) without spilling, still 2 blocks of 8 warps per SM.
FORWARD_NUM_WARPS = 4
BACKWARD_NUM_WARPS = 8
BACKWARD_MAX_REGISTERS = 128
MAX_FOOTPRINT_SLOTS = 16  # footprint positions per tile; longer footprints loop over tiles
# The backward splits the channels over a second grid axis until there are about this many
# programs: with all channels in one program, 16x256x28x28 <- 14x14 NCHW ran as 64 programs
# (0.104 ms on an H100, 3x the C++ kernel; the C++ kernel's same fix took it 0.162 -> 0.034 ms).
BACKWARD_TARGET_PROGRAMS = 1024

# (BLOCK_P, BLOCK_C) tiles of 1024 elements the forward launcher picks from, by layout.
FORWARD_TILES = {
    "nchw": ((64, 16), (256, 4), (1024, 1)),
    "channels_last": ((64, 16), (16, 64), (4, 256)),
}
# Backward channel blocks by layout; BLOCK_S * BLOCK_K * BLOCK_C is 1024 (channels_last) or
# 1024 with BLOCK_C = 4 (NCHW: footprint pixels are the contiguous axis).
BACKWARD_CHANNEL_BLOCKS = {"nchw": (4,), "channels_last": (16, 64)}
BACKWARD_FOOTPRINT_BLOCKS = (1, 2, 4, 8, 16)
TILE_ELEMENTS = 1024


@triton.jit
def _merge_forward_kernel(
    out_ptr, feat_ptr, mask_ptr, prev_ptr, src_y_ptr, src_x_ptr,
    C, HW, W, ws,
    stride_n, stride_p, stride_c,
    mask_stride_n, mask_stride_p, mask_stride_c,
    prev_stride_n, prev_stride_p, prev_stride_c,
    pixel_blocks, channel_blocks,
    HAS_PREV: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cb = pid % channel_blocks
    t = pid // channel_blocks
    pb = t % pixel_blocks
    n = (t // pixel_blocks).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < HW
    inside = p_ok[:, None] & (c < C)[None, :]
    p64 = p.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    off = n * stride_n + p64 * stride_p + c64 * stride_c
    f = tl.load(feat_ptr + off, mask=inside).to(ACC)
    m = tl.load(mask_ptr + n * mask_stride_n + p64 * mask_stride_p + c64 * mask_stride_c, mask=inside).to(ACC)
    v = f * m
    if HAS_PREV:
        y = p // W
        x = p - y * W
        sy = tl.load(src_y_ptr + y, mask=p_ok, other=0)
        sx = tl.load(src_x_ptr + x, mask=p_ok, other=0)
        sp = (sy.to(tl.int64) * ws + sx)[:, None]
        v = v + tl.load(prev_ptr + n * prev_stride_n + sp * prev_stride_p + c64 * prev_stride_c, mask=inside).to(ACC)
    tl.store(out_ptr + off, v.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _merge_backward_kernel(
    grad_feat_ptr, grad_mask_ptr, grad_prev_ptr, grad_ptr, feat_ptr, mask_ptr, begin_y_ptr, begin_x_ptr,
    C, W, hs, ws, footprint_w, footprint_slots,
    stride_n, stride_p, stride_c,
    mask_stride_n, mask_stride_p, mask_stride_c,
    prev_stride_n, prev_stride_p, prev_stride_c,
    source_blocks, channels_per_program, grad_mask_chunk_stride,
    HAS_PREV: tl.constexpr, MASK_FULL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    GRAD_FEAT: tl.constexpr, GRAD_MASK: tl.constexpr,
):
    # GRAD_FEAT / GRAD_MASK: whether grad_feat (reads mask) / grad_mask (reads feat) are asked
    # for; what is not asked for is neither read nor computed nor written.
    # A program owns BLOCK_S source pixels of one image and every output pixel in their
    # footprints, across one chunk of channels_per_program channels (program_id(1)):
    # grad_prev is a sum over the tile's footprint axis, and a broadcast mask's gradient a sum
    # over the chunk's channels kept in registers across the channel loop, stored at
    # chunk * grad_mask_chunk_stride (several chunks: a float32 buffer the launcher sums).
    # Footprints longer than BLOCK_K slots take several k0 steps, each adding to the
    # grad_prev written by the previous one (same program, so still no atomics).
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    c_begin = chunk * channels_per_program
    c_end = tl.minimum(C, c_begin + channels_per_program)
    sb = pid % source_blocks
    n = (pid // source_blocks).to(tl.int64)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < hs * ws
    sy = s // ws
    sx = s - sy * ws
    y0 = tl.load(begin_y_ptr + sy, mask=s_ok, other=0)
    y1 = tl.load(begin_y_ptr + sy + 1, mask=s_ok, other=0)
    x0 = tl.load(begin_x_ptr + sx, mask=s_ok, other=0)
    x1 = tl.load(begin_x_ptr + sx + 1, mask=s_ok, other=0)
    s64 = s.to(tl.int64)[:, None]
    for k0 in range(0, footprint_slots, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ky = k // footprint_w
        kx = k - ky * footprint_w
        y = y0[:, None] + ky[None, :]
        x = x0[:, None] + kx[None, :]
        slot_ok = s_ok[:, None] & (y < y1[:, None]) & (x < x1[:, None])
        pix = y.to(tl.int64) * W + x
        mask_grad = tl.zeros([BLOCK_S, BLOCK_K], dtype=ACC)
        if GRAD_FEAT and not MASK_FULL:
            mask_slot = tl.load(mask_ptr + n * mask_stride_n + pix * mask_stride_p, mask=slot_ok, other=0).to(ACC)
        for c0 in range(c_begin, c_end, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < c_end
            c64 = c.to(tl.int64)
            ok = slot_ok[:, :, None] & c_ok[None, None, :]
            off = n * stride_n + pix[:, :, None] * stride_p + c64[None, None, :] * stride_c
            g = tl.load(grad_ptr + off, mask=ok, other=0).to(ACC)
            moff = n * mask_stride_n + pix[:, :, None] * mask_stride_p + c64[None, None, :] * mask_stride_c
            if GRAD_MASK:
                f = tl.load(feat_ptr + off, mask=ok, other=0).to(ACC)
                if MASK_FULL:
                    tl.store(grad_mask_ptr + moff, (g * f).to(grad_mask_ptr.dtype.element_ty), mask=ok)
                else:
                    mask_grad += tl.sum(g * f, axis=2)
            if GRAD_FEAT:
                if MASK_FULL:
                    m = tl.load(mask_ptr + moff, mask=ok, other=0).to(ACC)
                else:
                    m = mask_slot[:, :, None]
                tl.store(grad_feat_ptr + off, (g * m).to(grad_feat_ptr.dtype.element_ty), mask=ok)
            if HAS_PREV:
                prev_grad = tl.sum(g, axis=1)
                poff = n * prev_stride_n + s64 * prev_stride_p + c64[None, :] * prev_stride_c
                p_ok = s_ok[:, None] & c_ok[None, :]
                if k0 > 0:
                    prev_grad += tl.load(grad_prev_ptr + poff, mask=p_ok, other=0).to(ACC)
                tl.store(grad_prev_ptr + poff, prev_grad.to(grad_prev_ptr.dtype.element_ty), mask=p_ok)
        if GRAD_MASK and not MASK_FULL:
            tl.store(grad_mask_ptr + chunk.to(tl.int64) * grad_mask_chunk_stride + n * mask_stride_n + pix * mask_stride_p,
                     mask_grad.to(grad_mask_ptr.dtype.element_ty), mask=slot_ok)


@functools.lru_cache(maxsize=256)
def _axis_tables_host(in_size, out_size):
    """(source index of each output position, footprint begin of each source position plus
    the end, longest footprint) along one axis, from F.interpolate's own index rule."""
    positions = torch.arange(in_size, dtype=torch.float64).view(1, 1, in_size)
    src = F.interpolate(positions, size=out_size, mode="nearest").view(out_size).to(torch.int64)
    begin = torch.searchsorted(src, torch.arange(in_size + 1))
    longest = int((begin[1:] - begin[:-1]).max())
    return src.to(torch.int32), begin.to(torch.int32), longest


@functools.lru_cache(maxsize=256)
def axis_tables(in_size, out_size, device):
    src, begin, longest = _axis_tables_host(in_size, out_size)
    return src.to(device), begin.to(device), longest


def _layout(fmt):
    return "channels_last" if fmt == torch.channels_last else "nchw"


def _strides(t, fmt):
    """(n, pixel, channel) element strides of a tensor dense in layout fmt; a single-channel
    tensor (broadcast mask) gets channel stride 0."""
    n, c, h, w = t.shape
    if fmt == torch.channels_last:
        return h * w * c, c, (1 if c > 1 else 0)
    return c * h * w, 1, (h * w if c > 1 else 0)


def acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _padded(size, block):
    return triton.cdiv(size, block) * block


def _pick_forward_tile(layout, hw, c):
    """The tile that wastes the fewest lanes on the axis that is contiguous in memory
    (pixels for NCHW, channels for channels_last); ties go to the longer contiguous run."""
    tiles = FORWARD_TILES[layout]
    if layout == "nchw":
        return min(tiles, key=lambda t: (_padded(hw, t[0]), -t[0]))
    return min(tiles, key=lambda t: (_padded(c, t[1]), -t[1]))


def _pick_backward_tile(layout, c, slots):
    block_k = min(MAX_FOOTPRINT_SLOTS, triton.next_power_of_2(slots))
    if layout == "nchw":
        block_c = BACKWARD_CHANNEL_BLOCKS["nchw"][0]
    else:
        block_c = 16 if c <= 16 else 64
    block_s = max(1, TILE_ELEMENTS // (block_k * block_c))
    return block_s, block_k, block_c


@dataclasses.dataclass
class LaunchPlan:
    """One kernel launch: enough to run it, or to compile it ahead of time."""

    kernel: object
    grid: tuple
    args: list  # positional runtime arguments, in kernel order
    constexprs: dict
    num_warps: int
    max_registers: int = None  # ptxas .maxnreg; None: ptxas decides

    def run(self):
        device = self.args[0].device
        if device.type == "cuda":  # Triton launches on the current device; make it the tensors' one
            with torch.cuda.device(device):
                self._launch()
        else:
            self._launch()

    def _launch(self):
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())

    def options(self):
        """Compile options, the same for the JIT launch and for AOT compilation."""
        options = {"num_warps": self.num_warps, "enable_fp_fusion": False}
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options


def plan_forward(feat, mask, prev):
    """(plan, out). out is allocated in feat's layout; plan is None when out is empty."""
    fmt = memory_format_of(feat)
    feat, mask = feat.contiguous(memory_format=fmt), mask.contiguous(memory_format=fmt)
    out = torch.empty_like(feat, memory_format=fmt)
    if out.numel() == 0:
        return None, out
    n, c, h, w = feat.shape
    has_prev = prev is not None
    if has_prev:
        prev = prev.contiguous(memory_format=fmt)
        src_y, _, _ = axis_tables(prev.shape[2], h, feat.device)
        src_x, _, _ = axis_tables(prev.shape[3], w, feat.device)
        ws, prev_strides = prev.shape[3], _strides(prev, fmt)
    else:  # never dereferenced: HAS_PREV=False compiles the prev path out
        prev, src_y, src_x, ws, prev_strides = feat, feat, feat, 1, (0, 0, 0)
    block_p, block_c = _pick_forward_tile(_layout(fmt), h * w, c)
    pixel_blocks, channel_blocks = triton.cdiv(h * w, block_p), triton.cdiv(c, block_c)
    args = [out, feat, mask, prev, src_y, src_x, c, h * w, w, ws,
            *_strides(feat, fmt), *_strides(mask, fmt), *prev_strides, pixel_blocks, channel_blocks]
    constexprs = dict(HAS_PREV=has_prev, ACC=acc_dtype(feat.dtype), BLOCK_P=block_p, BLOCK_C=block_c)
    plan = LaunchPlan(_merge_forward_kernel, (n * pixel_blocks * channel_blocks,), args, constexprs, FORWARD_NUM_WARPS)
    return plan, out


def _channel_chunks(programs, c, block_c):
    """(channels per program, chunks): enough programs to fill the GPU, whole BLOCK_C steps."""
    wanted = max(1, min(triton.cdiv(BACKWARD_TARGET_PROGRAMS, max(programs, 1)), triton.cdiv(c, block_c)))
    per_program = triton.cdiv(triton.cdiv(c, wanted), block_c) * block_c
    return per_program, triton.cdiv(c, per_program)


def plan_backward(grad_out, feat, mask, mask_channels, prev_size):
    """(plan, grad_feat, grad_mask, grad_prev, prev_accumulator, mask_accumulator). feat / mask
    may be None: the gradient that reads it (grad_mask / grad_feat) is then not computed (an
    empty tensor). prev_accumulator is the tensor the kernel sums grad_prev into: grad_prev
    itself, or a float32 buffer (copied into grad_prev after the launch) when a half-precision
    grad_prev would otherwise be re-read and re-rounded between footprint tiles.
    mask_accumulator is where a broadcast mask's gradient goes: grad_mask itself, or, when the
    channels are split over several programs, a (chunks, N, 1, H, W) buffer of per-chunk sums
    in the accumulation dtype, which topdown_merge_backward adds up after the launch."""
    fmt = memory_format_of(grad_out)
    grad_out = grad_out.contiguous(memory_format=fmt)
    feat, mask = (None if t is None else t.contiguous(memory_format=fmt) for t in (feat, mask))
    n, c, h, w = grad_out.shape
    has_prev = len(prev_size) == 2
    hs, ws = (int(prev_size[0]), int(prev_size[1])) if has_prev else (h, w)
    if not (0 <= hs <= h and 0 <= ws <= w and (h * w == 0 or hs * ws > 0)):
        raise ValueError(f"prev_size must be [] or [h, w] with 0 < h <= {h} and 0 < w <= {w}, got {list(prev_size)}")
    empty = lambda: grad_out.new_empty(0)  # noqa: E731
    grad_feat = empty() if mask is None else torch.empty_like(grad_out, memory_format=fmt)
    grad_mask = empty() if feat is None else grad_out.new_empty((n, mask_channels, h, w)).contiguous(memory_format=fmt)
    grad_prev = (grad_out.new_empty((n, c, hs, ws)).contiguous(memory_format=fmt) if has_prev else empty())
    if grad_out.numel() == 0:
        grad_mask.zero_()
        grad_prev.zero_()
        return None, grad_feat, grad_mask, grad_prev, grad_prev, grad_mask
    _, begin_y, longest_y = axis_tables(hs, h, grad_out.device)
    _, begin_x, longest_x = axis_tables(ws, w, grad_out.device)
    slots = longest_y * longest_x
    block_s, block_k, block_c = _pick_backward_tile(_layout(fmt), c, slots)
    prev_accumulator = grad_prev
    if has_prev and slots > block_k and grad_out.dtype in (torch.float16, torch.bfloat16):
        prev_accumulator = torch.empty(grad_prev.shape, dtype=torch.float32, device=grad_out.device).contiguous(memory_format=fmt)
    prev_strides = _strides(prev_accumulator, fmt) if has_prev else (0, 0, 0)
    source_blocks = triton.cdiv(hs * ws, block_s)
    channels_per_program, chunks = _channel_chunks(n * source_blocks, c, block_c)
    mask_full = mask_channels == c and c != 1
    mask_accumulator = grad_mask
    if chunks > 1 and feat is not None and not mask_full:
        acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        mask_accumulator = torch.empty((chunks, n, 1, h, w), dtype=acc, device=grad_out.device)
    # Tensors not passed are never dereferenced (their GRAD_* is False): grad_out stands in.
    args = [grad_feat if mask is not None else grad_out, mask_accumulator if feat is not None else grad_out,
            prev_accumulator if has_prev else grad_out, grad_out, grad_out if feat is None else feat,
            grad_out if mask is None else mask, begin_y, begin_x, c, w, hs, ws, longest_x, slots,
            *_strides(grad_out, fmt), *_strides(grad_out.new_empty((n, mask_channels, h, w)) if mask is None else mask, fmt),
            *prev_strides, source_blocks, channels_per_program, n * h * w]
    constexprs = dict(HAS_PREV=has_prev, MASK_FULL=mask_full, ACC=acc_dtype(grad_out.dtype),
                      BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_C=block_c, GRAD_FEAT=mask is not None, GRAD_MASK=feat is not None)
    plan = LaunchPlan(_merge_backward_kernel, (n * source_blocks, chunks), args, constexprs, BACKWARD_NUM_WARPS,
                      BACKWARD_MAX_REGISTERS)
    return plan, grad_feat, grad_mask, grad_prev, prev_accumulator, mask_accumulator


def topdown_merge(feat, mask, prev):
    """aim_kernels::topdown_merge with Triton kernels."""
    validate(feat, mask, prev)
    plan, out = plan_forward(feat, mask, prev)
    if plan is not None:
        plan.run()
    return out


def topdown_merge_backward(grad_out, feat, mask, mask_channels, prev_size):
    """aim_kernels::topdown_merge_backward with Triton kernels."""
    if len(prev_size) not in (0, 2):
        raise ValueError(f"prev_size must be [] or [h, w], got {list(prev_size)}")
    n, c, h, w = grad_out.shape
    # The forward's checks on stand-ins of the right shapes, then the backward's own.
    validate(grad_out if feat is None else feat, grad_out.new_empty((n, mask_channels, h, w)) if mask is None else mask, None)
    if feat is not None and (feat.shape != grad_out.shape or feat.dtype != grad_out.dtype or feat.device != grad_out.device):
        raise ValueError(f"feat must match grad_out's shape, dtype and device, got {tuple(feat.shape)} {feat.dtype} {feat.device}")
    if mask is not None and (mask.shape[1] != mask_channels or mask.dtype != grad_out.dtype or mask.device != grad_out.device):
        raise ValueError(f"mask must have mask_channels={mask_channels} channels and grad_out's dtype and device")
    plan, grad_feat, grad_mask, grad_prev, prev_accumulator, mask_accumulator = plan_backward(
        grad_out, feat, mask, mask_channels, prev_size)
    if plan is not None:
        plan.run()
        if prev_accumulator is not grad_prev:
            grad_prev.copy_(prev_accumulator)
        if mask_accumulator is not grad_mask:
            grad_mask.copy_(mask_accumulator.sum(0))
    return grad_feat, grad_mask, grad_prev
