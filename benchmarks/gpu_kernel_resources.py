"""Register use and spills of every Triton kernel configuration, compiled ahead of time for
sm_80 and sm_90 (no GPU needed), plus bytes moved per output element against the minimum.

    PYTHONPATH=. python benchmarks/gpu_kernel_resources.py [--json benchmarks/results/gpu_kernel_resources.json]
        [--cuda-build-log build.log]

The C++ CUDA kernels' registers and spills are printed by ptxas while the extension builds
(setup.py passes -Xptxas=-v to nvcc); give that build output as --cuda-build-log to have it
tabulated too, e.g. from
    AIM_KERNELS_CUDA=1 python setup.py build_ext --inplace 2>&1 | tee build.log
"""
import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch


def bytes_per_output_element(dtype, channels, mask_full, ratio):
    """(forward, backward) bytes per element of out / grad_feat for C channels and prev at
    H/ratio x W/ratio, with every tensor read or written exactly once: the minimum, and what
    the fused kernels move from DRAM (a broadcast mask and prev are re-read per channel or per
    footprint pixel, but from cache). Exceptions: the CUDA backward re-reads grad_out (+1
    element) for footprints longer than 4; the Triton backward re-reads and rewrites grad_prev
    once per extra 16-slot footprint tile."""
    e = torch.empty(0, dtype=dtype).element_size()
    mask = e if mask_full else e / channels
    prev = e / (ratio * ratio)
    forward = e + mask + prev + e  # feat, mask, prev in; out
    backward = e + e + mask + e + mask + prev  # grad_out, feat, mask in; grad_feat, grad_mask, grad_prev out
    return forward, backward


def ptxas_resources(log_text):
    """[(arch, kernel, registers, spill store bytes, spill load bytes)] from ptxas -v output."""
    rows, current = [], None
    for line in log_text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = {"symbol": m.group(1), "arch": m.group(2)}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            current["registers"] = int(m.group(1))
            rows.append(current)
            current = None
    symbols = "\n".join(r["symbol"] for r in rows)
    names = (subprocess.run(["c++filt"], input=symbols, capture_output=True, text=True).stdout.splitlines()
             if shutil.which("c++filt") else symbols.splitlines())
    for row, name in zip(rows, names):
        name = name.replace("aim_kernels::(anonymous namespace)::", "").replace("c10::", "").removeprefix("void ")
        row["kernel"] = name.split("(")[0]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the per-configuration rows here")
    parser.add_argument("--cuda-build-log", help="extension build output to read ptxas resource usage from")
    args = parser.parse_args()
    from aim_kernels.triton import aot

    start = time.time()
    unique = {}
    for label, plan in aot.topdown_merge_plans():
        unique.setdefault(aot.plan_key(plan), (label, plan))
    rows = []
    for label, plan in unique.values():
        for arch in aot.ARCHS:
            r = aot.compile_plan(plan, arch)
            rows.append(dict(config=label, kernel=r.kernel, arch=f"sm_{arch}", registers=r.registers,
                             spill_bytes=r.spill_bytes, shared_bytes=r.shared_bytes,
                             constexprs={k: str(v) for k, v in plan.constexprs.items()}))
    elapsed = time.time() - start

    summary = collections.defaultdict(list)
    for row in rows:
        c = row["constexprs"]
        tile = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK") or k in ("HAS_PREV", "MASK_FULL"))
        summary[(row["kernel"], row["arch"], tile)].append(row)
    print(f"{len(rows)} Triton compiles ({len(unique)} configurations x {len(aot.ARCHS)} archs) in {elapsed:.0f} s\n")
    print(f"{'kernel':<24} {'arch':<6} {'tile':<58} {'regs (min-max over dtypes/layouts)':>34} {'spill bytes':>12}")
    for (kernel, arch, tile), group in sorted(summary.items()):
        regs = [g["registers"] for g in group]
        spills = max(g["spill_bytes"] for g in group)
        print(f"{kernel:<24} {arch:<6} {tile:<58} {f'{min(regs)}-{max(regs)}':>34} {spills:>12}")
    worst = max(rows, key=lambda r: r["registers"])
    print(f"\nmost registers: {worst['registers']} ({worst['config']}, {worst['arch']}); "
          f"configurations with spills: {sum(r['spill_bytes'] > 0 for r in rows)}")

    print("\nbytes per output element at C=256 with prev at half size (x2), moved = minimum:")
    for dtype in (torch.float32, torch.float16):
        for mask_full in (False, True):
            fwd, bwd = bytes_per_output_element(dtype, 256, mask_full, 2)
            print(f"  {str(dtype):<14} mask {'(N,C,H,W)' if mask_full else '(N,1,H,W)'}  x2 prev: forward {fwd:.2f} B, backward {bwd:.2f} B")
    if args.cuda_build_log:
        with open(args.cuda_build_log) as f:
            cuda_rows = ptxas_resources(f.read())
        print(f"\nC++ CUDA kernels ({len(cuda_rows)} compiled functions):")
        for row in sorted(cuda_rows, key=lambda r: (r["kernel"], r["arch"])):
            print(f"  {row['arch']}  regs {row['registers']:3d}  spill st/ld {row['spill_stores']}/{row['spill_loads']} B  {row['kernel']}")
    else:
        print("\nC++ CUDA kernels: pass the extension build output as --cuda-build-log (ptxas -v lines).")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
