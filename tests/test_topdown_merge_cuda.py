"""CUDA side of topdown_merge.

Without a GPU: the build registered the C++ CUDA kernels as the ops' CUDA dispatch entries
(and CI fails when they were expected but not built), and the CUDA backend setting swaps
those entries for the Triton launchers and back. With a GPU (skipped here): numerics of both
CUDA backends against the reference, opcheck and torch.compile on CUDA tensors.

AIM_KERNELS_EXPECT_CUDA=1 (set by CI, whose `pip install .` must build csrc/cuda) turns a
build without CUDA kernels into a failure; on a CPU-only dev build the check is skipped.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import aim_kernels
from aim_kernels import _cuda_backend, _extension
from device_matrix import cuda_entries
from merge_checks import check_backward, check_forward

OPS = ("topdown_merge", "topdown_merge_backward")
HAS_TRITON = _cuda_backend.unavailable_reason("triton") is None
BUILT_WITH_CUDA = _extension.ext_has_cuda()
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def active_cuda_entry(op):
    active = [line for line in cuda_entries(op) if line.startswith("CUDA:")]
    return active[0] if active else None


def test_cuda_kernels_built_when_expected():
    if os.environ.get("AIM_KERNELS_EXPECT_CUDA") == "1":
        assert _extension.EXT_LOADED, f"aim_kernels._C did not load: {_extension.EXT_ERROR}"
        assert BUILT_WITH_CUDA, "AIM_KERNELS_EXPECT_CUDA=1 but aim_kernels._C was built without csrc/cuda"
    elif not BUILT_WITH_CUDA:
        pytest.skip("aim_kernels._C has no CUDA kernels (set AIM_KERNELS_EXPECT_CUDA=1 to make this a failure)")
    for op in OPS:
        registered = [line for line in cuda_entries(op) if "csrc/cuda/topdown_merge.cu" in line]
        assert registered, f"aim_kernels::{op} has no CUDA kernel from csrc/cuda: {cuda_entries(op)}"


def _cuda_kernel_resources():
    from aim_kernels import _C
    from aim_kernels.triton import aot

    if aot.cuobjdump() is None:
        pytest.skip("cuobjdump not found")
    return _C.__file__, aot.cuobjdump(), aot.resource_usage(_C.__file__)


def _demangle(symbols):
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found")
    return subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True).stdout.splitlines()


@pytest.mark.skipif(not BUILT_WITH_CUDA or not HAS_TRITON, reason="needs _C built with CUDA (and triton's cuobjdump)")
def test_cuda_kernels_registers_and_spills():
    # 32-bit index paths (every tensor < 2^31 elements: all realistic calls) must not spill.
    # The 64-bit fallbacks call ptxas's 64-bit division subroutine; a few of them keep 8 bytes
    # of saved registers on the stack around that call, which is all they may use.
    _, _, rows = _cuda_kernel_resources()
    assert {arch for _, arch, _, _ in rows} == {80, 90}
    names = _demangle([symbol for symbol, _, _, _ in rows])
    for (symbol, arch, registers, spill), name in zip(rows, names):
        wide_index = ", long," in name or ", long>" in name
        assert spill <= (8 if wide_index else 0), f"sm_{arch} {name}: {spill} bytes spilled, {registers} registers"


@pytest.mark.skipif(not BUILT_WITH_CUDA or not HAS_TRITON, reason="needs _C built with CUDA (and triton's cuobjdump)")
def test_cuda_float32_forward_has_no_fused_multiply_add():
    # Bit-identity with the reference's separate multiply and add needs FMUL then FADD in SASS.
    library, tool, rows = _cuda_kernel_resources()
    forward = sorted({symbol for symbol, _, _, _ in rows if "merge_forward_kernelIf" in symbol})
    assert len(forward) == 8  # int32/int64 index x scalar/vector x NCHW/channels_last
    for symbol in forward:
        sass = subprocess.run([tool, "-sass", "-fun", symbol, library], check=True, capture_output=True, text=True).stdout
        assert "FMUL" in sass and "FADD" in sass and "FFMA" not in sass, symbol


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_backend_setting_swaps_the_cuda_dispatch_entry(restore_cuda_backend):
    aim_kernels.set_cuda_backend("triton")
    assert aim_kernels.get_cuda_backend() == "triton"
    assert aim_kernels.backends()["triton"]["selected"] and not aim_kernels.backends()["cuda"]["selected"]
    for op in OPS:
        assert "_cuda_backend.py" in active_cuda_entry(op), cuda_entries(op)
    if BUILT_WITH_CUDA:
        for op in OPS:
            assert any(line.startswith("CUDA (inactive)") and ".cu" in line for line in cuda_entries(op))
        aim_kernels.set_cuda_backend("cuda")
        assert aim_kernels.get_cuda_backend() == "cuda" and aim_kernels.backends()["cuda"]["selected"]
        for op in OPS:
            assert "csrc/cuda/topdown_merge.cu" in active_cuda_entry(op), cuda_entries(op)
            assert len(cuda_entries(op)) == 1, "the Triton registration should be gone, not shadowed"
    else:
        # The Triton registration holds the CUDA key now; backends() must still say why "cuda" is out.
        assert "built without CUDA" in aim_kernels.backends()["cuda"]["reason"]
        with pytest.raises(RuntimeError, match="built without CUDA"):
            aim_kernels.set_cuda_backend("cuda")


def test_bad_backend_name_is_rejected():
    with pytest.raises(ValueError, match="cuda.*triton"):
        aim_kernels.set_cuda_backend("cudnn")


def _run_python(code, **env):
    # cwd outside the repository, so `-c` imports the installed package, not the source tree
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **env),
                          capture_output=True, text=True, cwd=tempfile.gettempdir())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_environment_variable_selects_the_backend_at_import():
    default = _run_python("import aim_kernels; print(aim_kernels.get_cuda_backend())", AIM_KERNELS_CUDA_BACKEND="")
    chosen = _run_python("import aim_kernels; print(aim_kernels.get_cuda_backend())", AIM_KERNELS_CUDA_BACKEND="triton")
    bogus = _run_python("import aim_kernels", AIM_KERNELS_CUDA_BACKEND="fastest")
    assert default.stdout.strip() == ("cuda" if BUILT_WITH_CUDA else "triton"), default.stderr
    assert chosen.stdout.strip() == "triton", chosen.stderr
    assert bogus.returncode != 0 and "AIM_KERNELS_CUDA_BACKEND must be one of" in bogus.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_another_op_plugs_into_the_backend_table():
    # What a second op (e.g. gumbel_binarize) does: declare its Triton launcher; it then
    # follows the setting like topdown_merge, whether declared before or after the choice.
    result = _run_python("""
        import torch, aim_kernels
        from aim_kernels._cuda_backend import register_triton_impl
        from aim_kernels._library import define
        define("plugin_probe(Tensor x) -> Tensor", torch.neg)
        def cuda_lines():
            return [l for l in torch._C._dispatch_dump("aim_kernels::plugin_probe").splitlines() if l.startswith("CUDA")]
        aim_kernels.set_cuda_backend("triton")
        register_triton_impl("plugin_probe", "torch", "neg")
        print(len(cuda_lines()))
        if aim_kernels._extension.ext_has_cuda():
            aim_kernels.set_cuda_backend("cuda")
            print(len(cuda_lines()))
        else:
            print(0)
    """, AIM_KERNELS_CUDA_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"], result.stdout + result.stderr


# ---- on a GPU -------------------------------------------------------------------------------

# The last two run the NCHW backward's channel chunks: 32 chunks of 8 channels, and 31 chunks
# of 9 channels for 250, where the last chunks start past C and contribute nothing.
GPU_SHAPES = [(2, 5, 7, 9, None), (2, 8, 8, 12, (4, 6)), (2, 5, 7, 9, (3, 4)), (1, 3, 9, 9, (3, 3)),
              (2, 3, 17, 19, (2, 3)), (2, 256, 14, 14, (7, 7)), (2, 250, 10, 10, (5, 5))]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("mask_c", ["1", "C"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_gpu_matches_reference(restore_cuda_backend, backend, shape, mask_c, fmt, dtype):
    if _cuda_backend.unavailable_reason(backend):
        pytest.skip(_cuda_backend.unavailable_reason(backend))
    aim_kernels.set_cuda_backend(backend)
    n, c, h, w, prev_hw = shape
    torch.manual_seed(0)
    make = lambda *s: torch.randn(*s, device="cuda", dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731
    feat, mask = make(n, c, h, w), make(n, c if mask_c == "C" else 1, h, w)
    prev = None if prev_hw is None else make(n, c, *prev_hw)
    out = aim_kernels.topdown_merge(feat, mask, prev)
    check_forward(out, feat, mask, prev)
    assert out.stride() == torch.empty_like(feat, memory_format=aim_kernels._library.memory_format_of(feat)).stride()
    grad = torch.randn_like(out)
    prev_size = [] if prev is None else list(prev_hw)
    check_backward(torch.ops.aim_kernels.topdown_merge_backward(grad, feat, mask, mask.shape[1], prev_size), grad, feat, mask, prev_size)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_opcheck_gradcheck_and_compile(restore_cuda_backend, backend):
    if _cuda_backend.unavailable_reason(backend):
        pytest.skip(_cuda_backend.unavailable_reason(backend))
    aim_kernels.set_cuda_backend(backend)
    args = [torch.randn(2, 3, 7, 9, device="cuda", dtype=torch.float64, requires_grad=True),
            torch.randn(2, 1, 7, 9, device="cuda", dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)]
    torch.library.opcheck(torch.ops.aim_kernels.topdown_merge.default, args)
    assert torch.autograd.gradcheck(aim_kernels.topdown_merge, args)
    compiled = torch.compile(lambda f, m, p: aim_kernels.topdown_merge(f, m, p) * 2, fullgraph=True)
    assert torch.equal(compiled(*args), aim_kernels.topdown_merge(*args) * 2)


@needs_gpu
@pytest.mark.gpu
def test_gpu_benchmark_path_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_topdown_merge.py"), "--quick"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "GB/s" in result.stdout
