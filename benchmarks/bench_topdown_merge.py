"""Throughput of topdown_merge: the fused C++ CPU kernel vs eager PyTorch and torch.compile
of the reference, forward and forward+backward, at AIM's ConvNeXt-T stage sizes.

    python benchmarks/bench_topdown_merge.py [--quick]

Runs every provider under both allocator settings (see common.py) and reports ms, effective
GB/s (minimum bytes a fused kernel must move / time) and that as a fraction of this machine's
elementwise bandwidth measured in the same run. Writes benchmarks/results/topdown_merge.{json,csv}.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import aim_kernels  # noqa: E402
from aim_kernels import reference  # noqa: E402

# (N, C, H, W, h, w): the top-down steps of a 224x224 ConvNeXt-T at batch 16, width 256.
CASES = [(16, 256, 56, 56, 28, 28), (16, 256, 28, 28, 14, 14), (16, 256, 14, 14, 7, 7)]
QUICK_CASES = [(4, 64, 56, 56, 28, 28)]


def min_bytes(n, c, H, W, h, w, elem=4):
    """Each tensor read or written once: forward reads feat, mask (N,1,H,W), prev and writes
    out; backward reads grad, feat, mask and writes grad_feat, grad_mask, grad_prev."""
    big, small, msk = n * c * H * W * elem, n * c * h * w * elem, n * H * W * elem
    forward = 2 * big + msk + small
    backward = 3 * big + 2 * msk + small
    return forward, forward + backward


def child(quick):
    torch.manual_seed(0)
    compiled = torch.compile(reference.topdown_merge, dynamic=False)
    providers = {"aim_kernels": aim_kernels.topdown_merge, "eager": reference.topdown_merge, "torch.compile": compiled}
    add_fn, add_bytes = common.bandwidth_probe()
    rows, pending_peaks = [], []
    for n, c, H, W, h, w in QUICK_CASES if quick else CASES:
        feat = torch.randn(n, c, H, W, requires_grad=True)
        mask = (torch.rand(n, 1, H, W) > 0.5).float().requires_grad_()
        prev = torch.randn(n, c, h, w, requires_grad=True)
        grad = torch.randn(n, c, H, W)
        nbytes = dict(zip(("forward", "forward+backward"), min_bytes(n, c, H, W, h, w)))
        fns = {"torch.add": add_fn}
        for name, fn in providers.items():
            # this shape's tensors bound now: peak memory is measured after the loop
            fns[(name, "forward")] = lambda fn=fn, x=(feat, mask, prev): common.no_grad_call(fn, *x)
            fns[(name, "forward+backward")] = lambda fn=fn, x=(feat, mask, prev), g=grad: torch.autograd.grad(fn(*x), x, g)
        stats = common.time_interleaved(fns, rounds=8 if quick else 30)
        fns.pop("torch.add")
        pending_peaks.append((fns, by_key := {}))
        bandwidth = add_bytes / (stats.pop("torch.add")["median_ms"] * 1e-3) / 1e9
        for (name, mode), t in stats.items():
            gbs = nbytes[mode] / (t["median_ms"] * 1e-3) / 1e9
            rows.append(by_key.setdefault((name, mode), {
                "allocator": os.environ.get(common.CHILD_ENV_FLAG, "inherited"),
                "shape": f"{n}x{c}x{H}x{W}<-{h}x{w}", "mode": mode, "provider": name,
                "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                "peak_MB": None, "GB/s": gbs, "frac_of_add_bw": gbs / bandwidth, "add_bw_GB/s": bandwidth,
            }))
    for fns, by_key in pending_peaks:  # after all timing: peak_memory_mb changes the allocator's settings
        for key, megabytes in common.peak_memory_mb(fns).items():
            by_key[key]["peak_MB"] = megabytes
    print(json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, for a smoke run")
    args = parser.parse_args()
    if os.environ.get(common.CHILD_ENV_FLAG):
        return child(args.quick)
    rows = [r for part in common.run_under_both_allocators(__file__, sys.argv[1:]) for r in part]
    common.add_speedups(rows)
    common.print_table(rows, ["allocator", "shape", "mode", "provider", "median_ms", "peak_MB", "GB/s", "frac_of_add_bw",
                              "x_vs_eager", "x_vs_compile"])
    baselines = {(r["allocator"], r["shape"]): r["add_bw_GB/s"] for r in rows}
    print("bandwidth baseline, torch.add(a, b, out=c) float32, measured interleaved with each shape:")
    for (allocator, shape), gbs in baselines.items():
        print(f"  {allocator} {shape}: {gbs:.1f} GB/s")
    paths = common.write_results("topdown_merge" + ("_quick" if args.quick else ""), rows, common.machine_info())
    print("wrote", *paths)


if __name__ == "__main__":
    main()
