"""gumbel_binarize: the Philox stream, exact masks against the reference, the
straight-through gradient, statistics of the noise, layouts, torch.compile, bad input.

The op runs on whichever kernel the dispatcher picks for CPU tensors: the C++ kernel when
aim_kernels._C is built (test_cpu_kernel_is_registered says whether it is), else the
reference itself. Triton is covered by tests/test_gumbel_triton.py."""
import math
import os

import pytest
import torch

import aim_kernels
from aim_kernels import reference
from aim_kernels._extension import EXT_LOADED
from aim_kernels._library import has_backend_kernel
from device_matrix import cpu_and_cuda
from tolerances import TOLERANCE

op = torch.ops.aim_kernels.gumbel_binarize.default
backward_op = torch.ops.aim_kernels.gumbel_binarize_backward.default

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Straight-through gradients are compared with tolerances.TOLERANCE: kernels and reference
# both compute in float32 (float64) and round once to the dtype. The kernels' portable exp
# is within 2 float32 ulp, and the reference's s * (1 - s) loses relative accuracy where s
# is near 1 (an absolute error of ~1e-7 |grad| / temperature), which atol covers.

SHAPES = [(), (1,), (7,), (2, 1, 13, 11), (3, 5, 9, 17), (9, 41, 34)]


def seed_tensor(seed):
    return torch.tensor(seed, dtype=torch.int64)


@pytest.mark.skipif(os.environ.get("AIM_KERNELS_DISABLE_EXT") == "1", reason="compiled kernels disabled on purpose")
def test_cpu_kernel_is_registered():
    # Every build has the C++ CPU kernels: without them the kernel-vs-reference tests below
    # would compare the reference with itself, so a missing build is a failure, not a skip.
    assert EXT_LOADED, aim_kernels.backends()["cpu"]["reason"]
    assert has_backend_kernel(op, "CPU") and has_backend_kernel(backward_op, "CPU")


# ---- the stream ------------------------------------------------------------------------

# Random123 known-answer vectors (kat_vectors, philox4x32 with 10 rounds).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


def test_stream_position_mapping():
    """Position n is word n % 4 of block n // 4, counter (low, high 32 bits of n // 4, 0, 0),
    key (low, high 32 bits of seed): check against philox4x32_10 directly, across a 2**32
    block boundary and for a seed with both key words set."""
    seed = 0x0123456789ABCDEF
    first = 4 * (2**32 - 1) + 2
    words = reference.philox_stream(9, seed, first)
    for i in range(9):
        n = first + i
        block = n // 4
        c = [torch.tensor([v], dtype=torch.int64) for v in (block & 0xFFFFFFFF, block >> 32, 0, 0)]
        expected = reference.philox4x32_10(*c, seed & 0xFFFFFFFF, seed >> 32)[n % 4]
        assert int(words[i]) == int(expected)
    # A negative seed is its 64-bit two's complement pattern.
    assert torch.equal(reference.philox_stream(8, -1, 0), reference.philox_stream(8, 2**64 - 1, 0))


def test_uniform_strictly_inside_unit_interval_and_noise_finite():
    # The extreme words give k = 0 and k = 2**23 - 1: u = 2**-24 and 1 - 2**-24.
    for word in (0, 0xFFFFFFFF):
        k = torch.tensor([word], dtype=torch.int64) >> 9
        q = ((2 * k + 1).float() / ((1 << 24) - 2 * k - 1).float())
        noise = reference.portable_log(q)
        assert torch.isfinite(noise).all()
        assert abs(abs(float(noise)) - math.log(2**24 - 1)) < 1e-5
    noise = reference.logistic_noise(1 << 16, 7, 0)
    assert torch.isfinite(noise).all() and noise.abs().max() < 16.7


def test_portable_log_accuracy():
    x = torch.cat([torch.rand(100_000) * 4, torch.logspace(-7, 7, 10_000)]).float().clamp_min(2**-24)
    got = reference.portable_log(x).double()
    exact = torch.log(x.double())
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(2**-24)
    assert ((got - exact).abs() <= 2 * ulp + 1e-12).all()


# ---- exact forward ---------------------------------------------------------------------

@cpu_and_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_exactly(dtype, shape, device):
    torch.manual_seed(0)
    logits = (torch.randn(shape) * 3).to(dtype).to(device)
    # The last offset makes the Philox block index cross 2**32 (the counter's high word).
    for seed, offset in [(5, 0), (-3, 3), (2**63 + 11, 2**40 + 1), (7, 4 * (2**32 - 9) + 2)]:
        s = seed_tensor(seed - 2**64 if seed >= 2**63 else seed).to(device)
        expected = reference.gumbel_binarize(logits, 0.7, True, s, offset)
        got = aim_kernels.gumbel_binarize(logits, 0.7, seed=seed, offset=offset)
        assert got.dtype == dtype and got.shape == logits.shape
        assert torch.equal(got, expected)


def test_noise_is_bit_identical_to_reference():
    """The mask flips exactly at logits = -noise: with a = -noise the sum is 0 (mask 1), with
    a one float32 step below it is negative (mask 0). Any one-ulp difference between the
    kernel's noise and the reference's would break one of the two."""
    numel, seed, offset = 50_000, 123456789, 17
    noise = reference.logistic_noise(numel, seed, offset)
    at_threshold = -noise
    below = torch.nextafter(at_threshold, torch.tensor(-math.inf))
    assert aim_kernels.gumbel_binarize(at_threshold, seed=seed, offset=offset).all()
    assert not aim_kernels.gumbel_binarize(below, seed=seed, offset=offset).any()


def test_mask_exact_near_and_across_the_decision_margin():
    """The float32 CPU kernel decides most elements from an approximate noise within a margin
    of 1e-4 and recomputes the exact noise only for elements closer than that: logits spread
    from well inside to well outside the margin around -noise (and NaN) must still give
    exactly the reference mask."""
    numel, seed, offset = 1 << 18, 2718, 3
    noise = reference.logistic_noise(numel, seed, offset)
    gen = torch.Generator().manual_seed(5)
    scale = torch.tensor([1e-7, 1e-5, 9e-5, 1.1e-4, 1e-3, 1.0])[torch.randint(0, 6, (numel,), generator=gen)]
    logits = -noise + scale * torch.randn(numel, generator=gen)
    logits[::1001] = math.nan
    expected = reference.gumbel_binarize(logits, 1.0, True, seed_tensor(seed), offset)
    assert torch.equal(aim_kernels.gumbel_binarize(logits, seed=seed, offset=offset), expected)


def test_explicit_seed_is_reproducible_and_offsets_address_one_stream():
    logits = torch.zeros(1000)
    a = aim_kernels.gumbel_binarize(logits, seed=9, offset=0)
    assert torch.equal(a, aim_kernels.gumbel_binarize(logits, seed=9, offset=0))
    # Elements 10.. of a call at offset 0 are elements 0.. of a call at offset 10.
    assert torch.equal(a[10:], aim_kernels.gumbel_binarize(logits[10:], seed=9, offset=10))
    assert not torch.equal(a, aim_kernels.gumbel_binarize(logits, seed=10, offset=0))


def test_mask_does_not_depend_on_layout():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 5, 7)
    expected = aim_kernels.gumbel_binarize(logits, seed=4, offset=1)
    cl = logits.contiguous(memory_format=torch.channels_last)
    got = aim_kernels.gumbel_binarize(cl, seed=4, offset=1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)
    transposed = logits.transpose(2, 3).contiguous().transpose(2, 3)  # not dense in either format
    assert torch.equal(aim_kernels.gumbel_binarize(transposed, seed=4, offset=1), expected)
    one_channel = torch.randn(2, 1, 5, 7).contiguous(memory_format=torch.channels_last)
    assert torch.equal(aim_kernels.gumbel_binarize(one_channel, seed=2),
                       aim_kernels.gumbel_binarize(one_channel.contiguous(), seed=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluation_is_threshold_without_randomness(dtype):
    logits = torch.tensor([-2.0, -0.0, 0.0, 1e-3, -1e-3, math.inf, -math.inf, math.nan]).to(dtype)
    state = torch.get_rng_state()
    out = aim_kernels.gumbel_binarize(logits, 0.3, training=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.tolist() == [0, 1, 1, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_logits_give_zero(dtype):
    logits = torch.full((64,), math.nan, dtype=dtype)
    assert not aim_kernels.gumbel_binarize(logits, seed=1).any()


# ---- seed=None ---------------------------------------------------------------------------

def test_seed_none_follows_manual_seed_and_never_repeats():
    logits = torch.zeros(4096)
    torch.manual_seed(123)
    first = aim_kernels.gumbel_binarize(logits)
    second = aim_kernels.gumbel_binarize(logits)
    torch.manual_seed(123)
    assert torch.equal(aim_kernels.gumbel_binarize(logits), first)
    assert torch.equal(aim_kernels.gumbel_binarize(logits), second)
    assert not torch.equal(first, second)


# ---- backward ----------------------------------------------------------------------------

@cpu_and_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference(dtype, training, device):
    torch.manual_seed(2)
    logits = (torch.randn(3, 1, 17, 19) * 4).to(dtype).to(device).requires_grad_()
    grad = torch.randn(logits.shape).to(dtype).to(device)
    out = aim_kernels.gumbel_binarize(logits, 0.6, training=training, seed=77, offset=5)
    (got,) = torch.autograd.grad(out, logits, grad)
    s = seed_tensor(77).to(device) if training else None
    expected = reference.gumbel_binarize_backward(grad, logits.detach(), 0.6, training, s, 5)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_backward_saves_only_logits_and_seed():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        aim_kernels.gumbel_binarize(logits, seed=3)
    assert len(saved) == 2
    assert saved[0] is logits or saved[0].data_ptr() == logits.data_ptr()
    assert saved[1].dtype == torch.int64 and saved[1].numel() == 1


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_gradcheck_straight_through(temperature):
    """The straight-through gradient is d soft / d logits with soft = sigmoid((a + noise) / t)
    and the same noise. g(a) has soft's value (so gradcheck's finite differences see soft)
    and the op's gradient (the hard term contributes value 0, gradient the op's backward)."""
    seed, offset = 31, 6
    logits = (torch.randn(4, 1, 3, 5, dtype=torch.float64) * 2).requires_grad_()
    noise = reference.logistic_noise(logits.numel(), seed, offset).double().reshape(logits.shape)

    def straight_through_with_soft_value(a):
        soft = torch.sigmoid((a + noise) / temperature).detach()
        hard = aim_kernels.gumbel_binarize(a, temperature, seed=seed, offset=offset)
        return soft + (hard - hard.detach())

    assert torch.autograd.gradcheck(straight_through_with_soft_value, (logits,))


# ---- statistics --------------------------------------------------------------------------

def test_mask_mean_matches_sigmoid_over_seeds():
    """For fixed logits a, P(mask = 1) = P(noise >= -a) = sigmoid(a). 400 seeds x 250
    positions per value; bound of 5 binomial standard deviations (false alarm ~ 6e-7 each)."""
    values = torch.tensor([-4.0, -2.0, -0.5, 0.0, 0.3, 1.0, 3.0])
    logits = values.repeat_interleave(250)
    total = torch.zeros_like(values, dtype=torch.float64)
    seeds = 400
    for seed in range(seeds):
        mask = aim_kernels.gumbel_binarize(logits, seed=1000 + seed)
        total += mask.double().reshape(len(values), 250).sum(dim=1)
    n = seeds * 250
    p = torch.sigmoid(values.double())
    assert ((total / n - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n)).all()


def test_noise_is_standard_logistic_kolmogorov_smirnov():
    stats = pytest.importorskip("scipy.stats")
    noise = reference.logistic_noise(200_000, 2024, 0).double().numpy()
    assert stats.kstest(noise, "logistic").pvalue > 1e-4


def test_offsets_and_seeds_give_independent_streams():
    """Masks at p = 1/2 (logits 0): streams at disjoint offsets, at neighbouring seeds, and
    neighbouring positions (lag 1 and 4, a Philox block apart) are uncorrelated within five
    standard errors 5 / sqrt(n)."""
    n = 200_000
    logits = torch.zeros(n)
    base = aim_kernels.gumbel_binarize(logits, seed=5, offset=0).double()
    others = [
        aim_kernels.gumbel_binarize(logits, seed=5, offset=n).double(),
        aim_kernels.gumbel_binarize(logits, seed=6, offset=0).double(),
        aim_kernels.gumbel_binarize(logits, seed=5 + 2**32, offset=0).double(),  # high key word
    ]
    bound = 5 / math.sqrt(n)
    for other in others:
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1]) < bound
    for lag in (1, 4):
        assert abs(torch.corrcoef(torch.stack([base[:-lag], base[lag:]]))[0, 1]) < bound


# ---- custom-op machinery -----------------------------------------------------------------

def opcheck_samples(device):
    torch.manual_seed(3)
    seed = lambda v: seed_tensor(v).to(device)  # noqa: E731
    yield torch.randn(2, 1, 5, 7, device=device, requires_grad=True), 0.5, True, seed(11), 3
    yield (torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(), 1.0,
           True, seed(-2), 0)
    yield torch.randn(6, 7, dtype=torch.float64, device=device, requires_grad=True), 2.0, False, None, 0
    yield torch.randn(3, 9, device=device).half().requires_grad_(), 0.9, True, seed(1), 2**50
    yield torch.randn(2, 3, 5, 4, device=device).transpose(2, 3).requires_grad_(), 0.7, True, seed(4), 1  # dense, permuted


@cpu_and_cuda
def test_opcheck(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(op, args)
        grad = torch.randn(args[0].shape, dtype=args[0].dtype, device=device)
        torch.library.opcheck(backward_op, (grad, args[0].detach(), *args[1:]))


@cpu_and_cuda
def test_torch_compile_fullgraph_explicit_seed(device):
    logits = torch.randn(2, 1, 9, 9, device=device, requires_grad=True)

    def step(a, seed, offset):
        return aim_kernels.gumbel_binarize(a, 0.5, seed=seed, offset=offset)

    compiled = torch.compile(step, fullgraph=True)
    for seed, offset in [(1, 0), (2, 81), (3, 162)]:
        got = compiled(logits, seed, offset)
        expected = step(logits, seed, offset)
        assert torch.equal(got, expected)
        g = torch.randn_like(got)
        (grad_got,) = torch.autograd.grad(got, logits, g)
        (grad_expected,) = torch.autograd.grad(expected, logits, g)
        assert torch.equal(grad_got, grad_expected)


def test_torch_compile_fullgraph_seed_none():
    """Under compile the seed is drawn by the graph from the default generator (Inductor's
    own RNG, so not the same draw as eager): manual_seed still makes runs reproducible and
    consecutive calls still differ."""
    logits = torch.zeros(4096)
    compiled = torch.compile(lambda a: aim_kernels.gumbel_binarize(a), fullgraph=True)
    torch.manual_seed(5)
    first, second = compiled(logits), compiled(logits)
    torch.manual_seed(5)
    assert torch.equal(compiled(logits), first)
    assert not torch.equal(first, second)


def test_torch_compile_fullgraph_evaluation():
    logits = torch.randn(3, 1, 4, 4)
    compiled = torch.compile(lambda a: aim_kernels.gumbel_binarize(a, training=False), fullgraph=True)
    assert torch.equal(compiled(logits), (logits >= 0).float())


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(training="yes"), TypeError, "training"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=-(2**63) - 1), ValueError, "seed"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(offset=2**63), ValueError, "offset"),
    (dict(offset=1.0), TypeError, "offset"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        aim_kernels.gumbel_binarize(torch.zeros(3), **kwargs)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits"):
        aim_kernels.gumbel_binarize([0.0, 1.0])
    with pytest.raises(TypeError, match="logits"):
        aim_kernels.gumbel_binarize(torch.zeros(3, dtype=torch.int64))


@pytest.mark.skipif(os.environ.get("AIM_KERNELS_DISABLE_EXT") == "1", reason="direct op calls are checked by the C++ kernel")
def test_direct_op_call_checks():
    with pytest.raises(RuntimeError, match="seed"):
        op(torch.zeros(3), 1.0, True, None, 0)
    with pytest.raises(RuntimeError, match="seed"):
        op(torch.zeros(3), 1.0, True, torch.tensor(1.0), 0)
    with pytest.raises(RuntimeError, match="temperature"):
        op(torch.zeros(3), 0.0, True, seed_tensor(1), 0)


# ---- CUDA (skipped without a GPU) --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype):
    torch.manual_seed(4)
    logits = (torch.randn(3, 1, 45, 37) * 3).to(dtype)
    grad = torch.randn(logits.shape).to(dtype)
    for training in (True, False):
        kwargs = dict(training=training, seed=2**40 + 3, offset=7)
        cpu = aim_kernels.gumbel_binarize(logits, 0.8, **kwargs)
        cuda = aim_kernels.gumbel_binarize(logits.cuda(), 0.8, **kwargs)
        assert torch.equal(cuda.cpu(), cpu)
        a = logits.cuda().requires_grad_()
        (g_cuda,) = torch.autograd.grad(aim_kernels.gumbel_binarize(a, 0.8, **kwargs), a, grad.cuda())
        b = logits.clone().requires_grad_()
        (g_cpu,) = torch.autograd.grad(aim_kernels.gumbel_binarize(b, 0.8, **kwargs), b, grad)
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, **TOLERANCE[dtype])
