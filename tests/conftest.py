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
