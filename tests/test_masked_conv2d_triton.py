"""Triton launcher of masked_conv2d under TRITON_INTERPRET=1 on CPU tensors, against the dense
composition, with the bounds of test_masked_conv2d.py.

It runs itself again under the interpreter (tests/interpreter.py); the numerics tests below
run only in that subprocess.
"""
import pytest
import torch

from interpreter import needs_interpreter, not_in_subprocess, run_under_interpreter
from masked_conv2d_checks import CONVS, DTYPES, FORCE_SPARSE, LAYOUTS, check_against_dense, make_inputs


@not_in_subprocess
def test_under_interpreter(tmp_path):
    run_under_interpreter(__file__, tmp_path)


@pytest.fixture(scope="module")
def interpreted():
    from aim_kernels.triton import masked_conv2d

    assert type(masked_conv2d._masked_conv_gemm_kernel).__name__ == "InterpretedFunction"
    return masked_conv2d


def _call(module, x, w, b, mask, prev, kwargs):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return module.masked_conv2d(x, w, b, mask, prev, pair(kwargs["stride"]), pair(kwargs["padding"]),
                                pair(kwargs["dilation"]), kwargs["groups"])


@needs_interpreter
@pytest.mark.parametrize("conv", [c for c in CONVS if c[0] != "3x3/s2"], ids=lambda c: c[0])  # strides: 2x3, dw3x3/s2
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_kernels_match_dense(monkeypatch, interpreted, conv, layout, dtype):
    if dtype == torch.bfloat16 and conv[7] == 1:
        # The interpreter's tl.dot multiplies bfloat16 bit patterns as integers (numpy has no
        # bfloat16: 16x16 ones times 1.5 gives 4.2e9, not 24); the bfloat16 GEMM kernel is checked
        # by the AOT compile (test_masked_conv2d_triton_aot.py) only.
        pytest.skip("Triton interpreter: tl.dot on bfloat16 is wrong")
    monkeypatch.setenv(FORCE_SPARSE, "2")
    # C_out 70 > BLOCK_N and 40 input channels > BLOCK_K: several tiles each way
    big = (conv[0], 40 if conv[7] == 1 else 70, 70, *conv[3:7], 1 if conv[7] == 1 else 70)
    for density, prev_ratio in ((0.0, "x2"), (0.4, "odd"), (1.0, None)):
        x, w, b, mask, prev, kwargs = make_inputs(big, dtype, layout, n=2, hw=(7, 6), density=density, prev_ratio=prev_ratio)
        out = _call(interpreted, x, w, b, mask, prev, kwargs)
        check_against_dense(out, x, w, b, mask, prev, kwargs, truncating_bfloat16=True)
        assert out.is_contiguous(memory_format=LAYOUTS[layout])


@needs_interpreter
def test_dense_above_crossover_and_no_bias(monkeypatch, interpreted):
    monkeypatch.setenv(FORCE_SPARSE, "0")
    x, w, _, mask, prev, kwargs = make_inputs(CONVS[1], torch.float32, "nchw", bias=False)
    check_against_dense(_call(interpreted, x, w, None, mask, prev, kwargs), x, w, None, mask, prev, kwargs)
    monkeypatch.setenv(FORCE_SPARSE, "2")
    check_against_dense(_call(interpreted, x, w, None, mask, prev, kwargs), x, w, None, mask, prev, kwargs)


@needs_interpreter
def test_default_is_dense_without_counting_the_mask(monkeypatch, interpreted):
    # Measured on an H100: the dense composition at every density (DENSE_ABOVE = 0), decided
    # before the mask is counted, since counting it is a host sync.
    monkeypatch.delenv(FORCE_SPARSE, raising=False)
    assert interpreted.DENSE_ABOVE == 0
    x, w, b, mask, prev, kwargs = make_inputs(CONVS[1], torch.float32, "nchw", density=0.05)

    def fail(*args, **kwargs):
        raise AssertionError("the sparse path ran")

    with monkeypatch.context() as patched:  # only around the call: the check below may count
        patched.setattr(interpreted, "plan_masked_conv2d", fail)
        patched.setattr(torch.Tensor, "sum", fail)
        out = _call(interpreted, x, w, b, mask, prev, kwargs)
    check_against_dense(out, x, w, b, mask, prev, kwargs)
