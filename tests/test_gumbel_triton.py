"""Triton gumbel_binarize kernels without a GPU.

- Numerics: the launchers run on CPU tensors under TRITON_INTERPRET=1, which must be set
  before the kernels are decorated, so test_interpreter_* re-runs this file as a script in
  a subprocess with it set; the script compares against the CPU kernel: noise and masks bit
  for bit, gradients within tolerance.
- Compilation: the kernels are compiled ahead of time for sm_80 and sm_90 (in this
  process, without the interpreter); they must not spill, and the PTX must contain no FMA
  and no approximate division (either would break the bit-exact stream).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRETER_TIMEOUT_S = 600


def test_interpreter_matches_cpu_kernel_bit_for_bit(tmp_path):
    # Run as a script from outside the repository: it imports the installed package (with its
    # compiled CPU kernel to compare against), not the source tree.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                            timeout=INTERPRETER_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "interpreter checks passed" in result.stdout


def _interpreter_checks():
    """Run by the subprocess above, with TRITON_INTERPRET=1."""
    import math

    import aim_kernels
    from aim_kernels import reference
    from aim_kernels.triton import gumbel_binarize as tri
    from tolerances import TOLERANCE

    assert aim_kernels.backends()["cpu"]["available"], aim_kernels.backends()["cpu"]["reason"]  # not the reference
    op = torch.ops.aim_kernels.gumbel_binarize.default
    backward_op = torch.ops.aim_kernels.gumbel_binarize_backward.default
    torch.manual_seed(0)

    # The noise itself, bit for bit, through the mask's flip point (see
    # test_gumbel_binarize.test_noise_is_bit_identical_to_reference).
    numel, seed, offset = 20_000, 987654321, 3
    noise = reference.logistic_noise(numel, seed, offset)
    s = torch.tensor(seed)
    assert tri.gumbel_binarize(-noise, 1.0, True, s, offset).all()
    below = torch.nextafter(-noise, torch.tensor(-math.inf))
    assert not tri.gumbel_binarize(below, 1.0, True, s, offset).any()

    cases = [((2, 1, 13, 11), 5, 0), ((3, 5, 9, 17), -7, 2**40 + 3), ((1,), 2**62, 1), ((9, 41, 34), 1, 2)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape, seed, offset in cases:
            logits = (torch.randn(shape) * 3).to(dtype)
            logits.view(-1)[0] = math.nan
            grad = torch.randn(shape).to(dtype)
            for training in (True, False):
                s = torch.tensor(seed) if training else None
                args = (0.7, training, s, offset)
                assert torch.equal(tri.gumbel_binarize(logits, *args), op(logits, *args)), (dtype, shape, training)
                got = tri.gumbel_binarize_backward(grad, logits, *args)
                expected = backward_op(grad, logits, *args)
                if dtype in (torch.float32, torch.float16):
                    # The gradient is not part of the bit-exact contract: the C++ kernel's
                    # AVX-512 path uses FMA log/exp (within ~2 ulp of the portable ones).
                    assert torch.equal(got.isnan(), expected.isnan())
                    torch.testing.assert_close(got, expected, **TOLERANCE[dtype], equal_nan=True)
                elif dtype == torch.bfloat16:
                    # The interpreter narrows float32 to bfloat16 by truncation (a GPU and
                    # the C++ kernel round to nearest even): at most one bf16 ulp apart.
                    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-30, equal_nan=True)
                else:
                    # float64 uses the platform exp on both sides.
                    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15, equal_nan=True)

    cl = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    out = tri.gumbel_binarize(cl, 1.0, True, torch.tensor(4), 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, aim_kernels.gumbel_binarize(cl.contiguous(), seed=4, offset=1))
    print("interpreter checks passed")


# ---- ahead-of-time compilation -----------------------------------------------------------

ARCHS = (80, 90)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def _cuobjdump():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _local_bytes(cubin):
    """LOCAL memory of the kernel in the cubin: spilled registers (and local arrays)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    return int(re.search(r"LOCAL:(\d+)", report).group(1)), int(re.search(r"REG:(\d+)", report).group(1))


def _plan(which, dtype, training=True):
    """The launcher's own plan for a CPU tensor: the exact arguments a GPU launch would get."""
    from aim_kernels.triton import gumbel_binarize as tri

    logits = torch.zeros(3, 1, 37, 41, dtype=dtype)
    seed = torch.tensor(5)
    if which == "forward":
        return tri.plan_forward(logits, 0.7, training, seed, 3)[0]
    return tri.plan_backward(torch.zeros_like(logits), logits, 0.7, training, seed, 3)[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="AOT compilation needs the real JIT")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(POINTER_TYPES))
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_aot_compiles_without_spills_fma_or_approximate_division(arch, dtype, which):
    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found")
    from aim_kernels.triton import aot

    compiled = aot.compile_plan(_plan(which, dtype), arch)
    assert compiled.spill_bytes == 0, f"{which} {dtype} sm_{arch}: {compiled.spill_bytes} bytes spilled, {compiled.registers} registers"
    ptx = compiled.ptx
    if dtype != torch.float64:  # float64 math is outside the bit-exact contract
        assert not re.search(r"\bfma\.rn\.f32\b", ptx), "a float32 FMA would change the stream's rounding"
        assert not re.search(r"\bdiv\.(full|approx)\.f32\b", ptx), "divisions must be correctly rounded"
        assert "div.rn.f32" in ptx


@pytest.mark.parametrize("dtype", list(POINTER_TYPES))
def test_backward_temperature_in_input_precision(dtype):
    """A Python float is typed fp32 by Triton: float64 logits would be divided by a rounded
    temperature. The launcher passes it through memory in the opmath type."""
    from aim_kernels.triton import aot

    signature, _, _ = aot.specialize(_plan("backward", dtype))
    assert signature["temperature_ptr"] == ("*fp64" if dtype == torch.float64 else "*fp32")
    assert signature["x_ptr"] == POINTER_TYPES[dtype]


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_launchers_set_the_tensors_cuda_device(which, monkeypatch):
    """Triton launches on the current CUDA device: each launcher goes through LaunchPlan.run,
    which enters torch.cuda.device(tensor's device). Checked with the device and the kernel
    launch mocked (no GPU here)."""
    from aim_kernels.triton import topdown_merge as merge

    plan = _plan(which, torch.float32)
    assert isinstance(plan, merge.LaunchPlan)
    events = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    class FakeTensor:
        device = torch.device("cuda", 1)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append("launch")

    monkeypatch.setattr(torch.cuda, "device", Device)
    plan.args[0] = FakeTensor()
    plan.kernel = Kernel()
    plan.run()
    assert events == [("enter", torch.device("cuda", 1)), "launch", ("exit", torch.device("cuda", 1))]
    # and the launchers call plan.run (not the kernel directly)
    import inspect

    from aim_kernels.triton import gumbel_binarize as tri

    for launcher in (tri.gumbel_binarize, tri.gumbel_binarize_backward):
        source = inspect.getsource(launcher)
        assert "plan.run()" in source and "_kernel[" not in source


if __name__ == "__main__":
    _interpreter_checks()
