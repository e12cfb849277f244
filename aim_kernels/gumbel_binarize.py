"""gumbel_binarize: binary Gumbel-softmax with the straight-through estimator, the noise
drawn in-kernel from a counter-based Philox4x32-10 stream and recomputed in backward."""
import torch

from aim_kernels import reference
from aim_kernels._checks import check_positive_finite, check_tensor
from aim_kernels._cuda_backend import register_triton_impl
from aim_kernels._library import define, memory_format_of

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


def gumbel_binarize(logits, temperature=1.0, *, training=True, seed=None, offset=0):
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
    validate(logits, temperature, training, seed, offset)
    temperature = float(temperature)
    if not training:
        seed_tensor = None
    elif seed is None:
        seed_tensor = draw_seed(logits.device)
    else:
        seed_tensor = torch.tensor(_as_int64(seed), dtype=torch.int64, device=logits.device)
    return _forward(logits, temperature, training, seed_tensor, offset)


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


@torch.library.register_fake("aim_kernels::gumbel_binarize")
def _(logits, temperature, training, seed, offset):
    return torch.empty_like(logits, memory_format=memory_format_of(logits))


@torch.library.register_fake("aim_kernels::gumbel_binarize_backward")
def _(grad_out, logits, temperature, training, seed, offset):
    return torch.empty_like(logits, memory_format=memory_format_of(logits))


def _setup_context(ctx, inputs, output):
    logits, temperature, training, seed, offset = inputs
    ctx.save_for_backward(logits, seed)
    ctx.temperature, ctx.training, ctx.offset = temperature, training, offset


def _backward_rule(ctx, grad_out):
    logits, seed = ctx.saved_tensors
    grad = _backward(grad_out, logits, ctx.temperature, ctx.training, seed, ctx.offset)
    return grad, None, None, None, None


torch.library.register_autograd("aim_kernels::gumbel_binarize", _backward_rule, setup_context=_setup_context)
