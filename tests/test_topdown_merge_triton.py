"""Triton launchers of topdown_merge under TRITON_INTERPRET=1 on CPU tensors, against the reference.

It runs itself again under the interpreter (tests/interpreter.py); the numerics tests below
run only in that subprocess.
"""
import pytest
import torch

from interpreter import needs_interpreter, not_in_subprocess, run_under_interpreter
from merge_checks import check_backward, check_forward


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# (N, C, H, W, prev (h, w) or None): odd sizes, identity, x2 (the FPN case), x3, non-integer
# ratios per axis (7 -> 3, 9 -> 4), a footprint longer than one 16-slot tile (1x2 -> 7x9), C=1.
SHAPES = [
    (2, 5, 7, 9, None),
    (2, 5, 7, 9, (7, 9)),
    (2, 6, 8, 12, (4, 6)),
    (1, 3, 9, 9, (3, 3)),
    (2, 5, 7, 9, (3, 4)),
    (2, 3, 7, 9, (1, 2)),
    (2, 1, 5, 6, (2, 3)),
]


@not_in_subprocess
def test_under_interpreter(tmp_path):
    run_under_interpreter(__file__, tmp_path)


@pytest.fixture(scope="module")
def interpreted():
    from aim_kernels.triton import topdown_merge

    assert type(topdown_merge._merge_forward_kernel).__name__ == "InterpretedFunction"
    return topdown_merge


def _inputs(shape, mask_channels, dtype, layout):
    n, c, h, w, prev_hw = shape
    fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    feat = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    mask = torch.randn(n, c if mask_channels == "C" else 1, h, w, dtype=dtype).contiguous(memory_format=fmt)
    prev = None if prev_hw is None else torch.randn(n, c, *prev_hw, dtype=dtype).contiguous(memory_format=fmt)
    return feat, mask, prev


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_channels", ["1", "C"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_reference(interpreted, shape, mask_channels, layout, dtype):
    feat, mask, prev = _inputs(shape, mask_channels, dtype, layout)
    out = interpreted.topdown_merge(feat, mask, prev)
    check_forward(out, feat, mask, prev, truncating_bfloat16=True)
    assert out.is_contiguous(memory_format=LAYOUTS[layout]) or feat.shape[1] == 1

    grad = torch.randn_like(out)
    prev_size = [] if prev is None else list(prev.shape[2:])
    grads = interpreted.topdown_merge_backward(grad, feat, mask, mask.shape[1], prev_size)
    check_backward(grads, grad, feat, mask, prev_size, truncating_bfloat16=True)
    if prev is not None:
        assert grads[2].is_contiguous(memory_format=LAYOUTS[layout]) or feat.shape[1] == 1


@needs_interpreter
@pytest.mark.parametrize("mask_channels", ["1", "C"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_computes_only_the_gradients_asked_for(interpreted, mask_channels, layout):
    feat, mask, prev = _inputs((2, 5, 7, 6, (3, 4)), mask_channels, torch.float32, layout)
    grad = torch.randn(feat.shape).contiguous(memory_format=LAYOUTS[layout])
    full = interpreted.topdown_merge_backward(grad, feat, mask, mask.shape[1], [3, 4])
    for given_feat, given_mask in ((feat, None), (None, mask), (None, None)):
        got = interpreted.topdown_merge_backward(grad, given_feat, given_mask, mask.shape[1], [3, 4])
        assert torch.equal(got[2], full[2])
        assert torch.equal(got[0], full[0]) if given_mask is not None else got[0].numel() == 0
        assert torch.equal(got[1], full[1]) if given_feat is not None else got[1].numel() == 0


@needs_interpreter
@pytest.mark.parametrize("shape", [(0, 3, 4, 4, (2, 2)), (2, 0, 4, 4, (2, 2)), (2, 3, 0, 4, (0, 2)), (0, 3, 4, 4, None)], ids=str)
def test_empty_shapes(interpreted, shape):
    n, c, h, w, prev_hw = shape
    feat, mask, prev = _inputs(shape, "1", torch.float32, "nchw")
    out = interpreted.topdown_merge(feat, mask, prev)
    assert out.shape == feat.shape
    prev_size = [] if prev is None else list(prev.shape[2:])
    grad_feat, grad_mask, grad_prev = interpreted.topdown_merge_backward(torch.zeros_like(out), feat, mask, mask.shape[1], prev_size)
    assert grad_feat.shape == feat.shape and grad_mask.shape == mask.shape
    assert torch.count_nonzero(grad_mask) == 0 and torch.count_nonzero(grad_prev) == 0


@needs_interpreter
def test_half_footprint_longer_than_a_tile_accumulates_in_float32(interpreted):
    # prev 1x1 under a 16x16 map: 256 footprint slots, 16 tiles. Summing into a float16
    # grad_prev tile by tile would round 16 times; the launcher sums into float32 instead.
    feat, mask, prev = _inputs((1, 4, 16, 16, (1, 1)), "1", torch.float16, "nchw")
    plan, _, _, grad_prev, accumulator, _ = interpreted.plan_backward(torch.ones_like(feat), feat, mask, mask.shape[1], [1, 1])
    assert accumulator.dtype == torch.float32 and plan.constexprs["BLOCK_K"] == interpreted.MAX_FOOTPRINT_SLOTS
    grad = torch.full_like(feat, 0.1)
    got = interpreted.topdown_merge_backward(grad, feat, mask, mask.shape[1], [1, 1])[2]
    exact = grad.double().sum(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(got.double(), exact, rtol=2**-11, atol=0)


@needs_interpreter
def test_bad_input_raises_before_launch(interpreted):
    feat, mask, prev = _inputs((2, 5, 7, 9, (3, 4)), "1", torch.float32, "nchw")
    with pytest.raises(ValueError, match="mask"):
        interpreted.topdown_merge(feat, mask[:, :, :3], prev)
    with pytest.raises(ValueError, match="prev_size"):
        interpreted.topdown_merge_backward(feat, feat, mask, mask.shape[1], [8, 4])
    with pytest.raises(ValueError, match="grad_out"):
        interpreted.topdown_merge_backward(feat[:1], feat, mask, mask.shape[1], [3, 4])


@needs_interpreter
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_backward_channel_chunks(interpreted, layout, dtype):
    # Few source pixels and many channels: the launcher splits the channels over programs and
    # sums the broadcast mask's per-chunk gradients after the launch, in the accumulation dtype.
    feat, mask, prev = _inputs((1, 130, 6, 6, (3, 3)), "1", dtype, layout)
    grad = torch.randn_like(feat)
    plan, _, _, _, _, partial = interpreted.plan_backward(grad, feat, mask, 1, [3, 3])
    assert plan.grid[1] > 1
    assert partial.shape[0] == plan.grid[1] and partial.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = interpreted.topdown_merge_backward(grad, feat, mask, 1, [3, 3])
    check_backward(grads, grad, feat, mask, [3, 3], truncating_bfloat16=True)
