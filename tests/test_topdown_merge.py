"""topdown_merge on the CPU kernel against aim_kernels/reference.py."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import aim_kernels
from aim_kernels import reference
import merge_checks
from device_matrix import cpu_and_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (N, C, H, W, h, w): prev (h, w) -> feat (H, W); None means no prev.
SHAPES = [
    pytest.param((2, 3, 8, 8, 4, 4), id="x2"),
    pytest.param((2, 3, 6, 10, 6, 10), id="x1"),
    pytest.param((1, 4, 9, 12, 3, 4), id="x3"),
    pytest.param((2, 3, 7, 7, 3, 3), id="3to7"),
    pytest.param((1, 5, 13, 11, 6, 4), id="odd-nonint"),
    pytest.param((3, 2, 5, 17, 2, 5), id="odd-mixed"),
    pytest.param((1, 3, 10, 30, 1, 3), id="x10-from-1row"),
    pytest.param((2, 3, 7, 9, None, None), id="no-prev"),
]


def make_inputs(shape, dtype, mask_channels, channels_last, requires_grad=False, device="cpu"):
    n, c, h_out, w_out, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feat = torch.randn(n, c, h_out, w_out, dtype=dtype).to(device).contiguous(memory_format=fmt)
    mask_c = 1 if mask_channels == "broadcast" else c
    mask = (torch.rand(n, mask_c, h_out, w_out) > 0.4).to(dtype).to(device).contiguous(memory_format=fmt)
    prev = None if h is None else torch.randn(n, c, h, w, dtype=dtype).to(device).contiguous(memory_format=fmt)
    tensors = [t for t in (feat, mask, prev) if t is not None]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return feat, mask, prev


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_channels", ["broadcast", "full"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@cpu_and_cuda
def test_forward_and_backward_match_reference(shape, dtype, mask_channels, channels_last, device):
    feat, mask, prev = make_inputs(shape, dtype, mask_channels, channels_last, device=device)
    out = aim_kernels.topdown_merge(feat, mask, prev)
    expected_fmt = torch.channels_last if channels_last and feat.shape[1] > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_fmt)
    merge_checks.check_forward(out, feat, mask, prev)

    grad = torch.randn_like(out)
    prev_size = [] if prev is None else list(prev.shape[2:])
    grads = torch.ops.aim_kernels.topdown_merge_backward(grad, feat, mask, mask.shape[1], prev_size)
    merge_checks.check_backward(grads, grad, feat, mask, prev_size)


@cpu_and_cuda
def test_autograd_routes_gradients_to_all_inputs(device):
    feat, mask, prev = make_inputs((2, 3, 8, 6, 4, 3), torch.float64, "broadcast", False, requires_grad=True, device=device)
    grad = torch.randn(feat.shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(aim_kernels.topdown_merge(feat, mask, prev), (feat, mask, prev), grad)
    expected = torch.autograd.grad(reference.topdown_merge(feat, mask, prev), (feat, mask, prev), grad)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@cpu_and_cuda
def test_fp32_forward_is_bit_identical_to_interpolate(device):
    # A ratio where float32 index arithmetic decides: 1/10 is not exact in binary.
    feat = torch.randn(2, 4, 50, 70, device=device)
    mask = (torch.rand(2, 1, 50, 70, device=device) > 0.5).float()
    for size in [(5, 7), (7, 3), (49, 69), (17, 23), (25, 35)]:
        prev = torch.randn(2, 4, *size, device=device)
        expected = feat * mask + F.interpolate(prev, size=(50, 70), mode="nearest")
        assert torch.equal(aim_kernels.topdown_merge(feat, mask, prev), expected), size


@cpu_and_cuda
def test_mixed_layouts_and_non_contiguous_inputs(device):
    base = torch.randn(2, 6, 9, 10, device=device)
    feat = base[:, ::2]  # strided: neither contiguous nor channels_last
    mask = torch.rand(2, 1, 9, 10, device=device).contiguous(memory_format=torch.channels_last)
    prev = torch.randn(2, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    out = aim_kernels.topdown_merge(feat, mask, prev)
    assert torch.equal(out, reference.topdown_merge(feat, mask, prev))
    assert out.is_contiguous()


@pytest.mark.parametrize(
    "feat_shape, mask_c, prev_shape",
    [((0, 3, 4, 4), 1, (0, 3, 2, 2)), ((2, 0, 4, 4), 1, (2, 0, 2, 2)), ((2, 3, 0, 4), 3, (2, 3, 0, 2)), ((2, 3, 4, 4), 1, None)],
    ids=["N0", "C0", "H0", "no-prev"],
)
@cpu_and_cuda
def test_empty_and_degenerate_shapes(feat_shape, mask_c, prev_shape, device):
    feat = torch.randn(feat_shape, device=device, requires_grad=True)
    mask = torch.rand(feat_shape[0], mask_c, *feat_shape[2:], device=device, requires_grad=True)
    prev = None if prev_shape is None else torch.randn(prev_shape, device=device, requires_grad=True)
    out = aim_kernels.topdown_merge(feat, mask, prev)
    assert torch.equal(out, reference.topdown_merge(feat, mask, prev))
    out.sum().backward()
    assert feat.grad.shape == feat.shape and mask.grad.shape == mask.shape
    if prev is not None:
        assert prev.grad.shape == prev.shape and not prev.grad.abs().sum()


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 2, 3), (1, 2, 6, 6, 3, 3), (2, 2, 4, 5, None, None)])
@pytest.mark.parametrize("mask_channels", ["broadcast", "full"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@cpu_and_cuda
def test_gradcheck_float64(shape, mask_channels, channels_last, device):
    feat, mask, prev = make_inputs(shape, torch.float64, mask_channels, channels_last, requires_grad=True, device=device)
    mask.data.uniform_()  # a continuous mask exercises grad_mask at generic points
    inputs = (feat, mask, prev)
    assert torch.autograd.gradcheck(aim_kernels.topdown_merge, inputs)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 4, 4), (1, 2, 7, 5, 3, 2), (2, 3, 4, 4, None, None)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@cpu_and_cuda
def test_opcheck(shape, channels_last, device):
    for mask_channels in ("broadcast", "full"):
        feat, mask, prev = make_inputs(shape, torch.float32, mask_channels, channels_last, requires_grad=True, device=device)
        torch.library.opcheck(torch.ops.aim_kernels.topdown_merge.default, (feat, mask, prev))
        grad = torch.randn_like(feat)
        prev_size = [] if prev is None else list(prev.shape[2:])
        torch.library.opcheck(
            torch.ops.aim_kernels.topdown_merge_backward.default, (grad, feat.detach(), mask.detach(), mask.shape[1], prev_size)
        )


@cpu_and_cuda
def test_torch_compile_fullgraph_matches_eager(device):
    def step(feat, mask, prev):
        return (aim_kernels.topdown_merge(feat, mask, prev) * 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    feat, mask, prev = make_inputs((2, 4, 8, 8, 4, 4), torch.float32, "broadcast", False, requires_grad=True, device=device)
    loss = compiled(feat, mask, prev)
    grads = torch.autograd.grad(loss, (feat, mask, prev))
    expected = step(feat, mask, prev)
    expected_grads = torch.autograd.grad(expected, (feat, mask, prev))
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@cpu_and_cuda
def test_torch_compile_inductor_fullgraph(device):
    def merge(feat, mask, prev):
        return aim_kernels.topdown_merge(feat, mask, prev).relu()

    compiled = torch.compile(merge, fullgraph=True)
    feat, mask, prev = make_inputs((2, 4, 8, 8, 4, 4), torch.float32, "full", True, device=device)
    torch.testing.assert_close(compiled(feat, mask, prev), merge(feat, mask, prev))


@cpu_and_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3), c=st.integers(1, 5),
    out_h=st.integers(1, 20), out_w=st.integers(1, 20),
    data=st.data(),
    mask_full=st.booleans(), channels_last=st.booleans(), with_prev=st.booleans(),
)
def test_fuzz_shapes_and_ratios(device, n, c, out_h, out_w, data, mask_full, channels_last, with_prev):
    h = data.draw(st.integers(1, out_h))
    w = data.draw(st.integers(1, out_w))
    shape = (n, c, out_h, out_w, h, w) if with_prev else (n, c, out_h, out_w, None, None)
    feat, mask, prev = make_inputs(shape, torch.float64, "full" if mask_full else "broadcast", channels_last, True, device)
    out = aim_kernels.topdown_merge(feat, mask, prev)
    expected = reference.topdown_merge(feat, mask, prev)
    assert torch.equal(out, expected)
    inputs = [t for t in (feat, mask, prev) if t is not None]
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@cpu_and_cuda
def test_backward_is_deterministic(device):
    feat, mask, prev = make_inputs((2, 8, 30, 30, 7, 11), torch.float32, "broadcast", False, requires_grad=True, device=device)
    grad = torch.randn(feat.shape, device=device)
    first = torch.autograd.grad(aim_kernels.topdown_merge(feat, mask, prev), (feat, mask, prev), grad)
    for _ in range(3):
        again = torch.autograd.grad(aim_kernels.topdown_merge(feat, mask, prev), (feat, mask, prev), grad)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def _good():
    return torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda f, m, p: (f.numpy(), m, p), TypeError, "feat must be a torch.Tensor"),
        (lambda f, m, p: (f[0], m, p), ValueError, "feat must be a 4-D"),
        (lambda f, m, p: (f, m[0], p), ValueError, "mask must be a 4-D"),
        (lambda f, m, p: (f, m, p[0]), ValueError, "prev must be a 4-D"),
        (lambda f, m, p: (f.long(), m.long(), p.long()), TypeError, "feat must be float32"),
        (lambda f, m, p: (f, m.bool(), p), TypeError, "mask must be float32"),
        (lambda f, m, p: (f, m.double(), p), TypeError, "mask has dtype torch.float64"),
        (lambda f, m, p: (f, m, p.half()), TypeError, "prev has dtype torch.float16"),
        (lambda f, m, p: (f, m.expand(2, 2, 8, 8), p), ValueError, "mask must have 1 channel"),
        (lambda f, m, p: (f, m[:1], p), ValueError, "mask must have shape"),
        (lambda f, m, p: (f, m[..., :7], p), ValueError, "mask must have shape"),
        (lambda f, m, p: (f, m, p[:1]), ValueError, "prev must have batch 2 and 3 channels"),
        (lambda f, m, p: (f, m, p[:, :2]), ValueError, "prev must have batch 2 and 3 channels"),
        (lambda f, m, p: (f, m, torch.randn(2, 3, 9, 4)), ValueError, "prev must not be larger"),
        (lambda f, m, p: (f, m, torch.randn(2, 3, 4, 0)), ValueError, "prev has an empty spatial size"),
        (lambda f, m, p: (f, m.to("meta"), p), ValueError, "mask is on meta"),
    ],
)
def test_bad_input(make_args, error, match):
    with pytest.raises(error, match=match):
        aim_kernels.topdown_merge(*make_args(*_good()))


def test_direct_op_call_with_bad_input_raises_not_crashes():
    feat, mask, prev = _good()
    with pytest.raises(RuntimeError, match="must not be larger"):
        torch.ops.aim_kernels.topdown_merge(feat, mask, torch.randn(2, 3, 9, 9))


def test_reference_fallback_when_extension_disabled(tmp_path):
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import aim_kernels\n"
        "assert sum('reference path' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "b = aim_kernels.backends()\n"
        "assert not b['cpu']['available'] and 'AIM_KERNELS_DISABLE_EXT' in b['cpu']['reason'], b\n"
        "assert b['reference']['available']\n"
        "f = torch.randn(2, 3, 6, 6, requires_grad=True); m = torch.rand(2, 1, 6, 6); p = torch.randn(2, 3, 3, 3)\n"
        "out = aim_kernels.topdown_merge(f, m, p)\n"
        # an oracle independent of aim_kernels.reference (which is the fallback itself)
        "assert torch.equal(out, f * m + torch.nn.functional.interpolate(p, size=(6, 6), mode='nearest'))\n"
        "out.sum().backward(); assert torch.equal(f.grad, m.expand_as(f))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, AIM_KERNELS_DISABLE_EXT="1")
    # cwd outside the repository, so the child imports the installed package, not the source tree
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(os.environ.get("AIM_KERNELS_DISABLE_EXT") == "1", reason="compiled kernels disabled on purpose")
def test_cpu_kernel_is_the_one_that_runs():
    # Every build has the C++ CPU kernels: their absence is a broken install, not a skip.
    status = aim_kernels.backends()["cpu"]
    assert status["available"], status["reason"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aim_kernels::topdown_merge", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aim_kernels::topdown_merge_backward", "CPU")
