"""Register use and spills of every Triton kernel configuration, compiled ahead of time for
sm_80 and sm_90 (no GPU needed), plus bytes moved per output element against the minimum.

    PYTHONPATH=. python benchmarks/gpu_kernel_resources.py [--json benchmarks/results/gpu_kernel_resources.json]

Register counts and spills of the C++ CUDA kernels come from the extension build itself
(nvcc runs with -Xptxas=-v); see the note printed at the end.
"""
import argparse
import collections
import json
import os
import sys
import time

import torch


def bytes_per_output_element(dtype, mask_full, ratio):
    """(bytes moved, minimum bytes) per element of out (forward) or grad_feat (backward) for
    N,C,H,W with prev at H/ratio x W/ratio: each tensor read or written exactly once."""
    e = torch.empty(0, dtype=dtype).element_size()
    mask = e if mask_full else 0  # a broadcast mask is C times smaller: ~0 per element
    prev = e / (ratio * ratio)
    forward = e + mask + prev + e  # feat, mask, prev in; out
    backward = 3 * e + mask + (e + mask) + prev  # grad_out, feat, mask in; grad_feat, grad_mask, grad_prev out
    return forward, backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the per-configuration rows here")
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

    print("\nbytes per output element, moved = minimum (every tensor read or written once):")
    for dtype in (torch.float32, torch.float16):
        for mask_full in (False, True):
            fwd, bwd = bytes_per_output_element(dtype, mask_full, 2)
            print(f"  {str(dtype):<14} mask {'(N,C,H,W)' if mask_full else '(N,1,H,W)'}  x2 prev: forward {fwd:.2f} B, backward {bwd:.2f} B")
    print("\nCUDA kernels: registers/spills are printed by ptxas during the extension build "
          "(nvcc -Xptxas=-v, see setup.py); the lead's report table comes from that log.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
