"""gumbel_binarize: binary Gumbel-softmax with the straight-through estimator, the noise
drawn in-kernel from a counter-based Philox4x32-10 stream and recomputed in backward."""
from typing import Optional

import torch
from torch import Tensor

from aim_kernels import reference
from aim_kernels._checks import check_positive_finite, check_tensor
from aim_kernels._cuda_backend import register_triton_impl
from aim_kernels._library import apply, call_below_autograd, define, memory_format_of, register_function, with_eager_variant

# seed: 0-d int64 tensor on logits' device (None in evaluation). A tensor, not an int, so
# that seed=None can be drawn from the device's generator inside a compiled graph, and a
# CUDA kernel reads it from device memory without a host sync.
_forward = define(
    "gumbel_binarize(Tensor logits, float temperature, bool training, Tensor? seed, SymInt offset) -> Tensor",
    reference.gumbel_binarize,
)
_backward = define(
    "gumbel_binarize_backward(Tensor grad_out, Tensor logits, float temperature, bool training, Tensor? seed,"
    " SymInt offset) -> Tensor",
    reference.gumbel_binarize_backward,
)
register_triton_impl("gumbel_binarize", "aim_kernels.triton.gumbel_binarize", "gumbel_binarize")
register_triton_impl("gumbel_binarize_backward", "aim_kernels.triton.gumbel_binarize", "gumbel_binarize_backward")

_INT64_MIN, _UINT64_END = -(2**63), 2**64


def gumbel_binarize(logits: Tensor, temperature: float = 1.0, *, training: bool = True, seed: Optional[int] = None,
                    offset: int = 0) -> Tensor:
    """Binary Gumbel straight-through mask of one logit channel.

    Training: ``hard = (logits + noise >= 0)`` with standard logistic noise
    ``log(u) - log(1 - u)``, u from Philox4x32-10 keyed by ``seed`` at stream positions
    ``offset + i`` (i the row-major element index); the gradient is the straight-through
    ``grad * soft * (1 - soft) / temperature``, ``soft = sigmoid((logits + noise) / temperature)``,
    with the noise recomputed in backward (only logits and the seed are saved).
    Evaluation (``training=False``): ``hard = (logits >= 0)``, no randomness used (the
    gradient, if asked for, is the same formula with zero noise).

    Seeds drawn for seed=None are 64-bit keys, so two calls share a stream only if two
    draws collide (probability about calls**2 / 2**65).

    Args:
        logits: any shape, float32/float16/bfloat16/float64, any layout.
        temperature: finite number > 0.
        training: see above.
        seed: int in [-2**63, 2**64) (taken as a 64-bit pattern), or None to draw one from
            torch's default generator for logits' device (``torch.manual_seed`` makes runs
            reproducible; each call gets a fresh 64-bit key). Under torch.compile the draw
            is part of the graph (Inductor's RNG: reproducible under manual_seed, but not
            the same draw as eager).
        offset: first stream position, 0 <= offset < 2**63. Calls with the same seed and
            disjoint ranges [offset, offset + numel) get independent noise.

    Returns:
        {0, 1} tensor of logits' shape and dtype (channels_last when logits is), NaN logits
        give 0. Same (seed, offset) gives bit-identical masks on every backend.
    """
    if torch.overrides.has_torch_function_unary(logits):  # FX proxies: a leaf call
        return torch.overrides.handle_torch_function(gumbel_binarize, (logits,), logits, temperature, training=training,
                                                     seed=seed, offset=offset)
    validate(logits, temperature, training, seed, offset)
    temperature = float(temperature)
    if not training:
        seed_tensor = None
    elif seed is None:
        seed_tensor = draw_seed(logits.device)
    else:
        seed_tensor = torch.tensor(_as_int64(seed), dtype=torch.int64, device=logits.device)
    if torch.compiler.is_compiling():  # torch.compile traces the op and its Autograd kernel
        return _forward(logits, temperature, training, seed_tensor, offset)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return call_below_autograd(_forward, logits, temperature, training, seed_tensor, offset)  # no graph to record
    return apply(_Binarize, logits, temperature, training, seed_tensor, offset)


def draw_seed(device):
    """The seed a call with seed=None uses: one int64 from torch's default generator for
    `device`, as a 0-d tensor on it."""
    return torch.randint(_INT64_MIN, 2**63 - 1, (), dtype=torch.int64, device=device)


def _as_int64(seed):
    """The int64 with seed's low 64 bits (two's complement), as the schema's int64 carries it."""
    return seed - _UINT64_END if seed >= 2**63 else seed


def validate(logits, temperature, training, seed, offset):
    check_tensor("logits", logits)
    check_positive_finite("temperature", temperature)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not _INT64_MIN <= seed < _UINT64_END:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset < 2**63:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")


def _check_fake_inputs(op, logits, temperature, training, seed, offset):
    torch._check(logits.dtype.is_floating_point, lambda: f"{op}: logits must be floating point, got {logits.dtype}")
    torch._check(temperature > 0, lambda: f"{op}: temperature must be > 0, got {temperature}")
    torch._check(offset >= 0, lambda: f"{op}: offset must be >= 0, got {offset}")
    if training:
        torch._check(seed is not None, lambda: f"{op}: training needs a seed tensor")
        torch._check(seed.dtype == torch.int64 and seed.numel() == 1 and seed.device == logits.device,
                     lambda: f"{op}: seed must be a one-element int64 tensor on logits' device")


@torch.library.register_fake("aim_kernels::gumbel_binarize")
def _(logits, temperature, training, seed, offset):
    _check_fake_inputs("gumbel_binarize", logits, temperature, training, seed, offset)
    return torch.empty_like(logits, memory_format=memory_format_of(logits))


@torch.library.register_fake("aim_kernels::gumbel_binarize_backward")
def _(grad_out, logits, temperature, training, seed, offset):
    _check_fake_inputs("gumbel_binarize_backward", logits, temperature, training, seed, offset)
    torch._check(grad_out.shape == logits.shape and grad_out.dtype == logits.dtype,
                 lambda: f"gumbel_binarize_backward: grad_out {tuple(grad_out.shape)} {grad_out.dtype} must match logits")
    return torch.empty_like(logits, memory_format=memory_format_of(logits))


@with_eager_variant
class _Binarize(torch.autograd.Function):
    generate_vmap_rule = True  # through the ops' batching rules below

    @staticmethod
    def forward(logits, temperature, training, seed, offset):
        return call_below_autograd(_forward, logits, temperature, training, seed, offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, temperature, training, seed, offset = inputs
        ctx.save_for_backward(logits, seed)
        ctx.temperature, ctx.training, ctx.offset = temperature, training, offset

    @staticmethod
    def backward(ctx, grad_out):
        logits, seed = ctx.saved_tensors
        args = (grad_out, logits, ctx.temperature, ctx.training, seed, ctx.offset)
        if torch.is_grad_enabled():  # create_graph: record the backward op, for a higher derivative
            return apply(_BinarizeBackward, *args), None, None, None, None
        return call_below_autograd(_backward, *args), None, None, None, None


@with_eager_variant
class _BinarizeBackward(torch.autograd.Function):
    """The straight-through gradient g * s * (1 - s) / T, s = sigmoid((logits + noise) / T),
    differentiable: linear in g (its derivative there is the backward op itself), and
    d/d logits = g * s (1 - s) (1 - 2 s) / T**2, with the noise recomputed by the reference
    Philox (plain PyTorch, the same bits as the kernels)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, logits, temperature, training, seed, offset):
        return call_below_autograd(_backward, grad_out, logits, temperature, training, seed, offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, logits, temperature, training, seed, offset = inputs
        ctx.save_for_backward(grad_out if ctx.needs_input_grad[1] else None, logits, seed)
        ctx.temperature, ctx.training, ctx.offset = temperature, training, offset

    @staticmethod
    def backward(ctx, gg):
        grad_out, logits, seed = ctx.saved_tensors
        d_grad_out = d_logits = None
        if ctx.needs_input_grad[0]:
            d_grad_out = apply(_BinarizeBackward, gg, logits, ctx.temperature, ctx.training, seed, ctx.offset)
        if ctx.needs_input_grad[1]:
            t = ctx.temperature
            s = torch.sigmoid(reference.straight_through_argument(logits, t, ctx.training, seed, ctx.offset))
            d_logits = (gg * grad_out * (s * (1 - s) * (1 - 2 * s) / (t * t))).to(logits.dtype)
        return d_grad_out, d_logits, None, None, None, None


register_function(_forward, _Binarize)
register_function(_backward, _BinarizeBackward)


# ---- vmap. Each sample of a vmapped call is a call of its own: the same (seed, offset), so
# the same noise at the same element index. In evaluation there is no noise and the op is
# elementwise: one call on the whole batch. In training the stream restarts at `offset` for
# every sample, so samples are separate calls.

def _per_sample(op, info, in_dims, *args):
    b = info.batch_size
    samples = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))) for i in range(b)]
    return torch.stack(samples), 0


@torch.library.register_vmap("aim_kernels::gumbel_binarize")
def _(info, in_dims, logits, temperature, training, seed, offset):
    if not training:
        return _forward(logits, temperature, training, seed, offset), in_dims[0]
    return _per_sample(_forward, info, in_dims, logits, temperature, training, seed, offset)


@torch.library.register_vmap("aim_kernels::gumbel_binarize_backward")
def _(info, in_dims, grad_out, logits, temperature, training, seed, offset):
    if not training:
        b = info.batch_size
        grad_out, logits = (t.movedim(d, 0) if d is not None else t.expand(b, *t.shape)
                            for t, d in ((grad_out, in_dims[0]), (logits, in_dims[1])))
        return _backward(grad_out, logits, temperature, training, seed, offset), 0
    return _per_sample(_backward, info, in_dims, grad_out, logits, temperature, training, seed, offset)
