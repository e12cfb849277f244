import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """For modules of small tensors (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    intra-op threads add only synchronization, which on a loaded 2-core machine costs far more
    than the work (measured: 7x slower training steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def waterbirds_dataset(tmp_path_factory):
    """tiny_datasets.make_waterbirds in a folder shared by the session, and its metadata rows;
    read only: a test that changes it works on a copy."""
    from tiny_datasets import make_waterbirds

    root = tmp_path_factory.mktemp("waterbirds")
    return root, make_waterbirds(str(root))


@pytest.fixture(scope="session")
def waterbirds(waterbirds_dataset):
    """The folder of :func:`waterbirds_dataset`."""
    return waterbirds_dataset[0]


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
    """"cpu" or "cuda", with the CUDA backend a tests/device_matrix.py parameter names selected
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
