"""Triton kernels for gumbel_binarize (forward and straight-through backward) and their
launchers, bit for bit the stream of csrc/philox.h (its header defines it; the PyTorch
reference is aim_kernels.reference.logistic_noise).

Each program covers BLOCK Philox blocks, i.e. 4 * BLOCK consecutive stream positions, as a
(BLOCK, 4) tile: row b holds the four output words of block b, so every generated word is
used and the tile is contiguous in memory. Philox rounds use tl.umulhi and uint32 wrapping
multiplies; the log/exp are the portable float32 polynomials of csrc/philox.h in the same
operation order, with divisions as tl.math.div_rn (correctly rounded, like C++ and CUDA's
__fdiv_rn) and kernels compiled with enable_fp_fusion=False, so no a*b+c becomes an FMA.

Launchers take the op's arguments (same order and meaning as the schema) and return its
output; they run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from aim_kernels._library import memory_format_of
from aim_kernels.triton.topdown_merge import LaunchPlan

BLOCK = 256  # Philox blocks per program: 1024 elements
NUM_WARPS = 4
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Random123's philox4x32_R, R = 10)."""
    # uint32 constants as tensors: a literal above 2**31 would be typed int64 and promote.
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _portable_log(x):
    """csrc/philox.h portable_log (Cephes logf), operation for operation."""
    bits = x.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.70710677
    e = e - small.to(tl.int32)
    m = tl.where(small, m + m, m) - 1.0
    z = m * m
    p = tl.full(m.shape, 7.0376836292e-2, tl.float32)
    p = p * m + -1.1514610310e-1
    p = p * m + 1.1676998740e-1
    p = p * m + -1.2420140846e-1
    p = p * m + 1.4249322787e-1
    p = p * m + -1.6668057665e-1
    p = p * m + 2.0000714765e-1
    p = p * m + -2.4999993993e-1
    p = p * m + 3.3333331174e-1
    y = (p * m) * z
    fe = e.to(tl.float32)
    y = y + fe * -2.12194440e-4
    y = y + z * -0.5
    r = m + y
    return r + fe * 0.693359375


@triton.jit
def _logistic_noise(word):
    """csrc/philox.h logistic_noise: log(u / (1 - u)), u = (2k + 1) / 2^24, k = word >> 9."""
    k = word >> 9
    num = (2 * k + 1).to(tl.float32)
    den = ((1 << 24) - 2 * k - 1).to(tl.float32)
    return _portable_log(tl.math.div_rn(num, den))


@triton.jit
def _logistic_derivative(z):
    """csrc/philox.h logistic_derivative (float32): e / (1 + e)^2, e = portable exp(-|z|)."""
    abs_bits = z.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    sign = tl.full(z.shape, 0x80000000, tl.uint32)
    x = (tl.minimum(abs_bits, 0x42AE0000) | sign).to(tl.float32, bitcast=True)
    t = x * 1.44269504088896341 + 0.5
    ni = t.to(tl.int32)  # truncation toward zero, then the floor correction
    ni = ni - (ni.to(tl.float32) > t).to(tl.int32)
    n = ni.to(tl.float32)
    r = x + -(n * 0.693359375)
    r = r + -(n * -2.12194440e-4)
    r2 = r * r
    p = tl.full(r.shape, 1.9875691500e-4, tl.float32)
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    p = (p * r2 + r) + 1.0
    e = p * ((ni + 127) << 23).to(tl.float32, bitcast=True)
    d = 1.0 + e
    out = tl.math.div_rn(e, d * d)
    return tl.where(z != z, z, out)


@triton.jit
def _tile_noise(seed_ptr, first_block, lead, numel, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """Element indices of this program's (BLOCK, 4) tile, their in-range mask, and their
    noise (zero in evaluation, where tiles simply group elements by four)."""
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    lane = tl.arange(0, 4)
    index = 4 * local[:, None] + lane[None, :] - lead
    in_range = (index >= 0) & (index < numel)
    if TRAINING:
        seed = tl.load(seed_ptr)
        k0 = tl.full((BLOCK,), 0, tl.uint32) + (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = tl.full((BLOCK,), 0, tl.uint32) + ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        block = first_block + local
        c0 = (block & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
        zero = tl.zeros((BLOCK,), tl.uint32)
        w0, w1, w2, w3 = _philox4x32_10(c0, c1, zero, zero, k0, k1)
        lane2 = lane[None, :]
        word = tl.where(lane2 == 0, w0[:, None], tl.where(lane2 == 1, w1[:, None], tl.where(lane2 == 2, w2[:, None], w3[:, None])))
        noise = _logistic_noise(word)
    else:
        noise = tl.zeros((BLOCK, 4), tl.float32)
    return index, in_range, noise


@triton.jit
def gumbel_binarize_forward_kernel(x_ptr, y_ptr, seed_ptr, numel, first_block, lead,
                                   TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    index, in_range, noise = _tile_noise(seed_ptr, first_block, lead, numel, TRAINING, BLOCK)
    x = tl.load(x_ptr + index, mask=in_range, other=0.0)
    if x.dtype == tl.float64:
        hard = x + noise.to(tl.float64) >= 0.0
    else:
        hard = x.to(tl.float32) + noise >= 0.0  # the sign of an IEEE sum is exact
    tl.store(y_ptr + index, tl.where(hard, 1.0, 0.0).to(y_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def gumbel_binarize_backward_kernel(g_ptr, x_ptr, y_ptr, seed_ptr, numel, first_block, lead, temperature_ptr,
                                    TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    # The temperature comes through memory, in float64 for float64 logits: a Python float
    # argument would be typed float32 by Triton.
    temperature = tl.load(temperature_ptr)
    index, in_range, noise = _tile_noise(seed_ptr, first_block, lead, numel, TRAINING, BLOCK)
    x = tl.load(x_ptr + index, mask=in_range, other=0.0)
    g = tl.load(g_ptr + index, mask=in_range, other=0.0)
    if x.dtype == tl.float64:
        # float64 is for gradcheck: platform exp, not part of the bit-exact contract.
        z = (x + noise.to(tl.float64)) / temperature
        e = tl.exp(-tl.abs(z))
        grad = g * (e / ((1.0 + e) * (1.0 + e))) / temperature
    else:
        z = tl.math.div_rn(x.to(tl.float32) + noise, temperature)
        grad = tl.math.div_rn(g.to(tl.float32) * _logistic_derivative(z), temperature)
    # Round to nearest even when narrowing, like c10::Half/BFloat16 in the C++ kernels.
    out = grad if x.dtype == tl.float64 else grad.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(y_ptr + index, out, mask=in_range)


def _launch_geometry(training, offset, numel):
    """(first_block, lead, blocks): the stream blocks a call covers (csrc/gumbel_binarize.h
    stream_range); in evaluation elements are simply grouped by four."""
    if not training:
        return 0, 0, (numel + 3) // 4
    lead = offset & 3
    return offset >> 2, lead, (lead + numel + 3) // 4


def _seed_arg(training, seed, logits):
    # In evaluation the kernel never reads the seed; any pointer of the right device will do.
    return seed if training else logits


def _plan(kernel, out, args, training, offset):
    first_block, lead, blocks = _launch_geometry(training, offset, out.numel())
    return LaunchPlan(kernel, (triton.cdiv(blocks, BLOCK),), [*args, out.numel(), first_block, lead],
                      dict(TRAINING=training, BLOCK=BLOCK), NUM_WARPS)


def plan_forward(logits, temperature, training, seed, offset):
    """(plan, out); plan is None when out is empty. out is row-major (callers apply the layout)."""
    x = logits.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return None, out
    return _plan(gumbel_binarize_forward_kernel, out, [x, out, _seed_arg(training, seed, x)], training, offset), out


def plan_backward(grad_out, logits, temperature, training, seed, offset):
    """(plan, out) of the backward, as plan_forward."""
    x, g = logits.contiguous(), grad_out.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return None, out
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    temperature_arg = torch.full((), temperature, dtype=opmath, device=x.device)
    args = [g, x, out, _seed_arg(training, seed, x)]
    plan = _plan(gumbel_binarize_backward_kernel, out, args, training, offset)
    plan.args.append(temperature_arg)
    return plan, out


def gumbel_binarize(logits, temperature, training, seed, offset):
    """Launcher for aim_kernels::gumbel_binarize (same arguments)."""
    plan, out = plan_forward(logits, temperature, training, seed, offset)
    if plan is not None:
        plan.run()  # on the tensors' device (LaunchPlan.run)
    return out.contiguous(memory_format=memory_format_of(logits))


def gumbel_binarize_backward(grad_out, logits, temperature, training, seed, offset):
    """Launcher for aim_kernels::gumbel_binarize_backward (same arguments)."""
    plan, out = plan_backward(grad_out, logits, temperature, training, seed, offset)
    if plan is not None:
        plan.run()
    return out.contiguous(memory_format=memory_format_of(logits))
