"""The device/backend matrix every op test runs on, as torchvision's cpu_and_cuda().

Use:
    from device_matrix import cpu_and_cuda

    @cpu_and_cuda
    def test_something(device):      # device: "cpu" or "cuda"
        x = torch.randn(..., device=device)

`cpu_and_cuda` parametrizes the `device` fixture (tests/conftest.py) over "cpu", "cuda" with
the C++ CUDA kernels, and "cuda" with the Triton kernels; the fixture selects that CUDA
backend for the test and restores the previous one after it. The CUDA cases carry the `gpu`
marker (`pytest -m gpu` runs exactly them) and are skipped where no GPU or that backend is
available. `devices()` is the parameter list itself, for a test that combines it by hand.
"""
import pytest
import torch

from aim_kernels import _cuda_backend


def _cuda_case(backend):
    reason = None if torch.cuda.is_available() else "needs a CUDA device"
    reason = reason or _cuda_backend.unavailable_reason(backend)
    marks = [pytest.mark.gpu, pytest.mark.skipif(reason is not None, reason=f"cuda/{backend}: {reason}")]
    return pytest.param(f"cuda/{backend}", id=f"cuda-{backend}", marks=marks)


def devices():
    """pytest params for the `device` fixture: "cpu", "cuda/cuda", "cuda/triton"."""
    return [pytest.param("cpu", id="cpu"), _cuda_case("cuda"), _cuda_case("triton")]


cpu_and_cuda = pytest.mark.parametrize("device", devices(), indirect=True)


def cuda_entries(op):
    """The CUDA lines of the op's dispatch table: the active kernel first, then inactive ones."""
    dump = torch._C._dispatch_dump(f"aim_kernels::{op}")
    return [line for line in dump.splitlines() if line.startswith("CUDA")]
