"""Every Triton kernel configuration the topdown_merge launchers can pick compiles ahead of
time for sm_80 and sm_90 (no GPU needed), without register spills.

The launcher's own plans are compiled (aim_kernels/triton/aot.py derives the JIT's
specialization from their arguments), so what is checked is what a GPU would compile.
By default float32 and bfloat16 (the 32- and 16-bit paths; bfloat16 needs more conversion
code than float16 on sm_80); tests marked slow add float16 and float64. Compiles run in a
process pool, one worker per core.
"""
import collections
import concurrent.futures
import multiprocessing
import os
import re

import pytest

from aim_kernels.triton import aot
from aim_kernels.triton import topdown_merge as merge

FAST_DTYPES = ("torch.float32", "torch.bfloat16")

_PLANS = None  # set in the parent before the pool forks; workers compile by index


def _compile(job):
    index, arch = job
    r = aot.compile_plan(_PLANS[index][1], arch)
    # bfloat16 results must round to nearest even (the interpreter truncates; see merge_checks):
    # conversions (or the bf16 arithmetic LLVM folds them into) carry .rn, never .rz.
    rounds_bfloat16 = ".rn.bf16" in r.ptx and not re.search(r"\.rz[\w.]*bf16", r.ptx)
    return r.registers, r.spill_bytes, "fma.rn.f32" in r.ptx, rounds_bfloat16


def _unique_plans(dtypes):
    unique = {}
    for label, plan in aot.topdown_merge_plans():
        if label.split()[2] in dtypes:
            unique.setdefault(aot.plan_key(plan), (label, plan))
    found = {label.split()[2] for label, _ in unique.values()}
    assert found == set(dtypes), f"no plans for {set(dtypes) - found}"
    return list(unique.values())


def _compile_all(dtypes):
    global _PLANS
    _PLANS = _unique_plans(dtypes)
    jobs = [(i, arch) for i in range(len(_PLANS)) for arch in aot.ARCHS]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        results = list(pool.map(_compile, jobs))
    return [(_PLANS[i][0], arch, *result) for (i, arch), result in zip(jobs, results)]


def test_plans_cover_every_configuration_the_launchers_can_pick():
    forward_tiles = collections.defaultdict(set)
    backward = collections.defaultdict(set)
    for label, plan in aot.topdown_merge_plans():
        c = plan.constexprs
        layout = label.split()[1]
        if label.startswith("forward"):
            forward_tiles[layout].add((c["BLOCK_P"], c["BLOCK_C"]))
        else:
            backward[layout].add((c["BLOCK_K"], c["BLOCK_C"], c["MASK_FULL"], c["HAS_PREV"]))
    for layout, tiles in merge.FORWARD_TILES.items():
        assert forward_tiles[layout] == set(tiles), layout
    for layout, channel_blocks in merge.BACKWARD_CHANNEL_BLOCKS.items():
        expected = {(k, bc, full, True) for k in merge.BACKWARD_FOOTPRINT_BLOCKS for bc in channel_blocks for full in (False, True)}
        expected |= {(1, bc, full, False) for bc in channel_blocks for full in (False, True)}
        assert backward[layout] == expected, layout


def _check(results):
    spilled = [(label, arch, regs, spill) for label, arch, regs, spill, _, _ in results if spill]
    assert not spilled, f"register spills: {spilled}"
    # fp32 outputs are promised bit-identical to the reference: no fused multiply-add.
    fused = [(label, arch) for label, arch, _, _, fma, _ in results if fma and "float32" in label and label.startswith("forward")]
    assert not fused, f"forward kernels with fma.rn.f32: {fused}"
    truncating = [(label, arch) for label, arch, _, _, _, rn in results if "bfloat16" in label and not rn]
    assert not truncating, f"bfloat16 kernels without round-to-nearest conversion: {truncating}"


def test_aot_compile_sm80_sm90_float32_bfloat16():
    _check(_compile_all(FAST_DTYPES))


@pytest.mark.slow
def test_aot_compile_sm80_sm90_float16_float64():
    _check(_compile_all(("torch.float16", "torch.float64")))
