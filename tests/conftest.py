import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import aim_kernels

    lines = [f"aim_kernels from {os.path.dirname(aim_kernels.__file__)}"]
    for name, status in aim_kernels.backends().items():
        lines.append(f"  backend {name}: {'available' if status['available'] else 'unavailable: ' + status['reason']}")
    return lines


@pytest.fixture
def restore_cuda_backend():
    """For a test that switches aim_kernels.set_cuda_backend itself: the choice is put back after it."""
    import aim_kernels

    before = aim_kernels.get_cuda_backend()
    yield
    if before is not None:
        aim_kernels.set_cuda_backend(before)


@pytest.fixture
def device(request):
    """"cpu" or "cuda", with the CUDA backend a tests/common.py parameter names selected
    for the duration of the test."""
    import aim_kernels

    name, _, backend = getattr(request, "param", "cpu").partition("/")
    if not backend:
        yield name
        return
    before = aim_kernels.get_cuda_backend()
    aim_kernels.set_cuda_backend(backend)
    try:
        yield name
    finally:
        if before is not None:
            aim_kernels.set_cuda_backend(before)
