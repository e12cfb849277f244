"""csrc/index_rules.h (nearest source index, footprints, their NearestAxis form that the CUDA
kernels use) exercised through the C++ CPU kernel, against F.interpolate for every size pair
up to 24 -> 40 along each axis."""
import pytest
import torch
import torch.nn.functional as F

from aim_kernels import _extension, reference

pytestmark = pytest.mark.skipif(not _extension.EXT_LOADED, reason=f"aim_kernels._C not loaded: {_extension.EXT_ERROR}")

PAIRS = [(i, o) for i in range(1, 25) for o in range(i, 41)]


@pytest.mark.parametrize("axis", ["H", "W"])
def test_nearest_rule_and_footprints_match_interpolate(axis):
    for in_size, out_size in PAIRS:
        out_shape = (3, out_size) if axis == "H" else (out_size, 3)
        in_shape = (3, in_size) if axis == "H" else (in_size, 3)
        # float64 positions: every index is exact, so equality means the same source index.
        prev = torch.arange(in_shape[0] * in_shape[1], dtype=torch.float64).view(1, 1, *in_shape)
        prev = prev.transpose(2, 3).contiguous() if axis == "H" else prev
        feat = torch.zeros(1, 1, *(reversed(out_shape) if axis == "H" else out_shape), dtype=torch.float64)
        mask = torch.zeros_like(feat)
        got = torch.ops.aim_kernels.topdown_merge(feat, mask, prev)
        assert torch.equal(got, F.interpolate(prev, size=feat.shape[-2:], mode="nearest")), (in_size, out_size)
        grad = torch.ones_like(feat)
        grad_prev = torch.ops.aim_kernels.topdown_merge_backward(grad, feat, mask, mask.shape[1], list(prev.shape[2:]))[2]
        expected = reference.topdown_merge_backward(grad, feat, mask, list(prev.shape[2:]))[2]
        assert torch.equal(grad_prev, expected), (in_size, out_size)  # footprint sizes
