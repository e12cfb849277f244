"""pytest-benchmark view of topdown_merge (not part of the test suite; run explicitly):

    pytest benchmarks/test_bench_topdown_merge.py --benchmark-group-by=param:shape,param:mode

Same providers and AIM stage shapes as bench_topdown_merge.py, which adds the bandwidth
baseline and both allocator settings; here pytest-benchmark's calibration and statistics.
"""
import pytest
import torch

import aim_kernels
from aim_kernels import reference

SHAPES = {"56<-28": (16, 256, 56, 56, 28, 28), "28<-14": (16, 256, 28, 28, 14, 14), "14<-7": (16, 256, 14, 14, 7, 7)}
_compiled = torch.compile(reference.topdown_merge, dynamic=False)
PROVIDERS = {"aim_kernels": aim_kernels.topdown_merge, "eager": reference.topdown_merge, "torch.compile": _compiled}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_topdown_merge(benchmark, shape, provider, mode):
    n, c, H, W, h, w = SHAPES[shape]
    feat = torch.randn(n, c, H, W, requires_grad=True)
    mask = (torch.rand(n, 1, H, W) > 0.5).float().requires_grad_()
    prev = torch.randn(n, c, h, w, requires_grad=True)
    grad = torch.randn(n, c, H, W)
    fn = PROVIDERS[provider]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(feat, mask, prev)
    else:
        def run():
            return torch.autograd.grad(fn(feat, mask, prev), (feat, mask, prev), grad)
    result = benchmark(run)
    expected = reference.topdown_merge(feat, mask, prev).detach()
    out = result if mode == "forward" else None
    if out is not None:
        torch.testing.assert_close(out, expected)
