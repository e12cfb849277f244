"""masked_conv2d against the dense composition topdown_merge(conv2d(x), mask, prev).

The tolerance and how it is derived: masked_conv2d_checks.check_against_dense.
"""
import pytest
import torch

import aim_kernels
from masked_conv2d_checks import CONVS, DTYPES, FORCE_SPARSE, LAYOUTS, check_against_dense, dense, make_inputs, pair


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c[0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density,prev_ratio", [(0.0, "x2"), (0.3, "x2"), (0.3, None), (0.6, "odd"), (1.0, "x2")])
def test_sparse_path_matches_dense(monkeypatch, conv, layout, dtype, density, prev_ratio):
    monkeypatch.setenv(FORCE_SPARSE, "2")
    x, w, b, mask, prev, kwargs = make_inputs(conv, dtype, layout, density=density, prev_ratio=prev_ratio)
    out = aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs)
    check_against_dense(out, x, w, b, mask, prev, kwargs)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("force", [None, "0"], ids=["measured-crossover", "always-dense"])
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dispatch_either_path_matches_dense(monkeypatch, force, density, layout):
    if force is not None:
        monkeypatch.setenv(FORCE_SPARSE, force)
    else:
        monkeypatch.delenv(FORCE_SPARSE, raising=False)
    for conv in (CONVS[1], CONVS[5]):
        x, w, b, mask, prev, kwargs = make_inputs(conv, torch.float32, layout, density=density)
        out = aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs)
        check_against_dense(out, x, w, b, mask, prev, kwargs)
        assert out.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("conv", [CONVS[1], CONVS[3], CONVS[5]], ids=lambda c: c[0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_single_active_pixel_at_borders(monkeypatch, conv, layout):
    monkeypatch.setenv(FORCE_SPARSE, "2")
    x, w, b, mask, prev, kwargs = make_inputs(conv, torch.float32, layout, n=1, hw=(8, 10))
    ho, wo = mask.shape[2:]
    for y, xx in [(0, 0), (0, wo - 1), (ho - 1, 0), (ho - 1, wo - 1), (ho // 2, 0), (ho // 2, wo // 2)]:
        single = torch.zeros_like(mask)
        single[0, 0, y, xx] = 1.5
        out = aim_kernels.masked_conv2d(x, w, b, single, prev, **kwargs)
        check_against_dense(out, x, w, b, single, prev, kwargs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[1], CONVS[5]], ids=lambda c: c[0])
@pytest.mark.parametrize("column_bytes", [None, "1", "100000000"], ids=["default-budget", "min-rows", "max-rows"])
def test_many_chunks_across_images(monkeypatch, layout, conv, column_bytes):
    # hundreds of active positions: several chunks, whose output ranges cross image boundaries;
    # the column budget sets the rows per chunk (clamped to 64..256): every size gives the same result
    monkeypatch.setenv(FORCE_SPARSE, "2")
    if column_bytes:
        monkeypatch.setenv("AIM_KERNELS_MASKED_CONV_COLUMN_BYTES", column_bytes)
    _, _, _, k, stride, padding, dilation, groups = conv
    big = (conv[0], 24, 24 if groups > 1 else 40, k, stride, padding, dilation, 24 if groups > 1 else 1)
    x, w, b, mask, prev, kwargs = make_inputs(big, torch.float32, layout, n=3, hw=(23, 29), density=0.5)
    out = aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs)
    check_against_dense(out, x, w, b, mask, prev, kwargs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_empty_batch(layout):
    x, w, b, mask, prev, kwargs = make_inputs(CONVS[1], torch.float32, layout, n=0)
    out = aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs)
    assert out.shape == (0, 7, 9, 11)


def test_nan_mask_is_active_like_the_dense_result(monkeypatch):
    monkeypatch.setenv(FORCE_SPARSE, "2")
    x, w, b, mask, prev, kwargs = make_inputs(CONVS[0], torch.float32, "nchw")
    mask[0, 0, 2, 3] = float("nan")
    out = aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs)
    assert out[0, :, 2, 3].isnan().all()


@pytest.mark.parametrize("conv", [CONVS[2], CONVS[6]], ids=lambda c: c[0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64(monkeypatch, conv, layout):
    monkeypatch.setenv(FORCE_SPARSE, "2")
    x, w, b, mask, prev, kwargs = make_inputs(conv, torch.float64, layout, n=1, hw=(6, 7), density=0.5)
    inputs = [t.requires_grad_() for t in (x, w, b, mask, prev)]
    assert torch.autograd.gradcheck(lambda *t: aim_kernels.masked_conv2d(*t, **kwargs), inputs)


def test_gradients_match_dense_autograd():
    x, w, b, mask, prev, kwargs = make_inputs(CONVS[1], torch.float32, "nchw", density=0.4)
    inputs = [t.requires_grad_() for t in (x, w, b, mask, prev)]
    grad = torch.randn(2, 7, 9, 11)
    got = torch.autograd.grad(aim_kernels.masked_conv2d(*inputs, **kwargs), inputs, grad)
    want = torch.autograd.grad(dense(*inputs, kwargs), inputs, grad)
    for name, g, e in zip(("x", "weight", "bias", "mask", "prev"), got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
    # only x requiring grad: the convolution is not recomputed, the gradient still right
    x2 = x.detach().requires_grad_()
    g_x, = torch.autograd.grad(aim_kernels.masked_conv2d(x2, w.detach(), b.detach(), mask.detach(), prev.detach(), **kwargs), x2, grad)
    torch.testing.assert_close(g_x, want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [CONVS[2], CONVS[5]], ids=lambda c: c[0])
@pytest.mark.parametrize("with_prev", [True, False])
def test_opcheck(conv, with_prev):
    x, w, b, mask, prev, kwargs = make_inputs(conv, torch.float32, "nchw", prev_ratio="x2" if with_prev else None)
    args = (x.requires_grad_(), w.requires_grad_(), b, mask.requires_grad_(), prev,
            list(pair(kwargs["stride"])), list(pair(kwargs["padding"])), list(pair(kwargs["dilation"])), kwargs["groups"])
    torch.library.opcheck(torch.ops.aim_kernels.masked_conv2d.default, args)


def test_compile_fullgraph():
    x, w, b, mask, prev, kwargs = make_inputs(CONVS[2], torch.float32, "channels_last")

    @torch.compile(fullgraph=True)
    def f(x, w, b, mask, prev):
        return aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs) * 2

    torch.testing.assert_close(f(x, w, b, mask, prev), 2 * aim_kernels.masked_conv2d(x, w, b, mask, prev, **kwargs))


def _bad(**changes):
    x, w, b, mask, prev, kwargs = make_inputs(CONVS[1], torch.float32, "nchw")
    args = dict(x=x, weight=w, bias=b, mask=mask, prev=prev)
    args.update({k: v for k, v in changes.items() if k in args})
    kwargs.update({k: v for k, v in changes.items() if k not in args})
    return args, kwargs


@pytest.mark.parametrize("changes,error,name", [
    (dict(mask=torch.ones(2, 1, 8, 11)), ValueError, "mask"),
    (dict(stride=2), ValueError, "mask"),  # mask sized for stride 1
    (dict(weight=torch.randn(7, 4, 3, 3)), ValueError, "weight"),
    (dict(groups=5), ValueError, "groups"),
    (dict(groups=2.0), TypeError, "groups"),
    (dict(x=torch.ones(2, 5, 9, 11, dtype=torch.int32)), TypeError, "x"),
    (dict(mask=torch.ones(2, 1, 9, 11, dtype=torch.int64)), TypeError, "mask"),
    (dict(weight=torch.randn(7, 5, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.randn(7, 5, 3, 3, device="meta")), ValueError, "weight"),
    (dict(prev=torch.randn(2, 7, 10, 11)), ValueError, "prev"),
    (dict(prev=torch.randn(2, 6, 4, 5)), ValueError, "prev"),
    (dict(bias=torch.randn(6)), ValueError, "bias"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=(1,)), TypeError, "padding"),
    (dict(x=torch.randn(2, 5, 1, 1), padding=0), ValueError, "x"),
])
def test_bad_input_names_the_argument(changes, error, name):
    args, kwargs = _bad(**changes)
    with pytest.raises(error, match=name):
        aim_kernels.masked_conv2d(**args, **kwargs)
