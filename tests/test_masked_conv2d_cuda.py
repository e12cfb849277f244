"""CUDA side of masked_conv2d.

Without a GPU: when aim_kernels._C was built with CUDA kernels, csrc/cuda/masked_conv2d.cu is
the op's CUDA dispatch entry (AIM_KERNELS_EXPECT_CUDA=1, set by CI, makes a build without
it a failure). With a GPU (skipped here): both CUDA backends against the dense composition,
sparse and dense paths, with the bounds of test_masked_conv2d.py.
"""
import os

import pytest
import torch

import aim_kernels
from aim_kernels import _cuda_backend, _extension
from masked_conv2d_checks import CONVS, DTYPES, FORCE_SPARSE, LAYOUTS, check_against_dense, make_inputs
from device_matrix import cuda_entries

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_kernel_registered_when_built():
    if os.environ.get("AIM_KERNELS_EXPECT_CUDA") == "1":
        assert _extension.ext_has_cuda(), "AIM_KERNELS_EXPECT_CUDA=1 but aim_kernels._C was built without csrc/cuda"
    elif not _extension.ext_has_cuda():
        pytest.skip("aim_kernels._C has no CUDA kernels (set AIM_KERNELS_EXPECT_CUDA=1 to make this a failure)")
    entries = cuda_entries("masked_conv2d")
    assert any("csrc/cuda/masked_conv2d.cu" in line for line in entries), entries


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("force", ["2", "0"], ids=["sparse", "dense"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c[0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backends_match_dense(monkeypatch, restore_cuda_backend, backend, force, conv, layout, dtype):
    reason = _cuda_backend.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    aim_kernels.set_cuda_backend(backend)
    monkeypatch.setenv(FORCE_SPARSE, force)
    # the dense path's cuDNN convolution would use TF32 by default: outside the float32 bound
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for density, prev_ratio in ((0.0, "x2"), (0.4, "odd"), (0.4, None), (1.0, "x2")):
        x, w, b, mask, prev, kwargs = make_inputs(conv, dtype, layout, density=density, prev_ratio=prev_ratio)
        x, w, b, mask = (t.cuda() for t in (x, w, b, mask))
        prev = None if prev is None else prev.cuda()
        out = aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs)
        torch.cuda.synchronize()
        check_against_dense(out.cpu(), *(None if t is None else t.cpu() for t in (x, w, b, mask, prev)), kwargs)
