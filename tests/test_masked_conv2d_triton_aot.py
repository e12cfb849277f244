"""Every Triton kernel configuration the masked_conv2d launcher can pick compiles ahead of time
for sm_80 and sm_90 (no GPU needed), without register spills; float32 GEMMs stay IEEE (no TF32).

The launcher's own plans are compiled (aim_kernels/triton/aot.py derives the JIT's
specialization from their arguments). By default float32 and bfloat16 with prev and bias;
the test marked slow adds float16, float64 and the variants without prev or bias.
"""
import concurrent.futures
import multiprocessing
import os

import pytest
import torch

from aim_kernels.triton import aot
from aim_kernels.triton import masked_conv2d as kernels

_PLANS = None  # set in the parent before the pool forks; workers compile by index


def masked_conv2d_plans(dtypes, variants):
    """(label, plan) per dtype, layout, kernel (GEMM: groups=1; depthwise) and (prev, bias) variant."""
    plans = []
    for dtype in dtypes:
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            for kernel, (c_in, c_out, groups) in (("gemm", (48, 80, 1)), ("depthwise", (80, 80, 80))):
                for with_prev, with_bias in variants:
                    x = torch.zeros(2, c_in, 12, 12, dtype=dtype).contiguous(memory_format=fmt)
                    w = torch.zeros(c_out, c_in // groups, 3, 3, dtype=dtype)
                    b = torch.zeros(c_out, dtype=dtype) if with_bias else None
                    mask = torch.ones(2, 1, 12, 12, dtype=dtype)
                    prev = torch.zeros(2, c_out, 6, 6, dtype=dtype).contiguous(memory_format=fmt) if with_prev else None
                    plan, _ = kernels.plan_masked_conv2d(x, w, b, mask, prev, [1, 1], [1, 1], [1, 1], groups)
                    plans.append((f"{kernel} {layout} {dtype} prev={with_prev} bias={with_bias}", plan))
    return plans


def _compile(job):
    index, arch = job
    r = aot.compile_plan(_PLANS[index][1], arch)
    return r.registers, r.spill_bytes, "tf32" in r.ptx


def _compile_all(dtypes, variants):
    global _PLANS
    unique = {}
    for label, plan in masked_conv2d_plans(dtypes, variants):
        unique.setdefault(aot.plan_key(plan), (label, plan))
    _PLANS = list(unique.values())
    jobs = [(i, arch) for i in range(len(_PLANS)) for arch in aot.ARCHS]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        results = list(pool.map(_compile, jobs))
    return [(_PLANS[i][0], arch, *result) for (i, arch), result in zip(jobs, results)]


def _check(results):
    assert results
    spilled = [(label, arch, regs, spill) for label, arch, regs, spill, _ in results if spill]
    assert not spilled, f"register spills: {spilled}"
    tf32 = [(label, arch) for label, arch, _, _, uses_tf32 in results if uses_tf32 and "float32" in label]
    assert not tf32, f"float32 GEMM on TF32 tensor cores: {tf32}"


def test_aot_compile_sm80_sm90_float32_bfloat16():
    _check(_compile_all((torch.float32, torch.bfloat16), [(True, True)]))


@pytest.mark.slow
def test_aot_compile_sm80_sm90_other_dtypes_and_variants():
    _check(_compile_all((torch.float16, torch.float64, torch.float32), [(False, False), (True, False), (False, True)]))
