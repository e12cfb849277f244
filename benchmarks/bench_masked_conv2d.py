"""Speed of masked_conv2d (the convolution only where the mask is active, fused with the
top-down merge) against the dense composition conv2d + topdown_merge and torch.compile of it,
at the stage shapes of ResNet-50 and ConvNeXt-T at 224x224, batch 8.

    python benchmarks/bench_masked_conv2d.py [--threads N] [--rounds R] [--quick] [--cases SUBSTRING]
        [--baseline-column-bytes BYTES]

Per shape and layout, one interleaved timing of: "dense" (F.conv2d + aim_kernels.topdown_merge),
"torch.compile" (of the dense composition), and at each density 0.05 .. 1.0 "masked_conv2d"
(the op as shipped: dense path above the measured crossover) and "sparse" (the sparse kernel at
every density, AIM_KERNELS_MASKED_CONV_DENSE_ABOVE=2, to locate the crossover). Masks are
i.i.d. per position (no spatial coherence to exploit: a conservative case). Reported: speedup
over dense and over torch.compile, the fraction of the ideal 1/density reached, and per shape
the crossover density (the lowest measured density where the sparse kernel is not faster than
dense). Under both allocator settings (common.py). Writes
benchmarks/results/masked_conv2d[_t<N>].{json,csv}.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import aim_kernels  # noqa: E402
from aim_kernels import reference  # noqa: E402

DENSITIES = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
FORCE_SPARSE = "AIM_KERNELS_MASKED_CONV_DENSE_ABOVE"
BATCH = 8
# (label, C_in, C_out, kernel, groups, H): prev is the coarser stage, (H/2) x (H/2), C_out channels.
CASES = [
    ("target 1x1 384->256", 384, 256, 1, 1, 28),
    ("target 3x3 384->256", 384, 256, 3, 1, 28),
    ("resnet50 lateral 1x1 512->256", 512, 256, 1, 1, 28),
    ("resnet50 lateral 1x1 1024->256", 1024, 256, 1, 1, 14),
    ("resnet50 lateral 1x1 2048->256", 2048, 256, 1, 1, 7),
    ("convnext_t lateral 1x1 192->256", 192, 256, 1, 1, 28),
    ("convnext_t lateral 1x1 768->256", 768, 256, 1, 1, 7),
    ("3x3 head 256->256", 256, 256, 3, 1, 14),
    ("convnext_t dw7x7 96", 96, 96, 7, 96, 56),
    ("convnext_t dw7x7 192", 192, 192, 7, 192, 28),
    ("convnext_t dw7x7 384", 384, 384, 7, 384, 14),
    ("convnext_t dw7x7 768", 768, 768, 7, 768, 7),
]
QUICK_CASES = [("quick 3x3 64->32", 64, 32, 3, 1, 14), ("quick dw7x7 32", 32, 32, 7, 32, 14)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


COLUMN_BYTES = "AIM_KERNELS_MASKED_CONV_COLUMN_BYTES"


def sparse_forced(fn, column_bytes=None):
    """fn with the sparse kernel forced at every density (and its column budget set, if given)."""
    forced = {FORCE_SPARSE: "2", **({COLUMN_BYTES: str(column_bytes)} if column_bytes else {})}

    def run():
        os.environ.update(forced)
        try:
            return fn()
        finally:
            for key in forced:
                del os.environ[key]
    return run


def child(quick, rounds, only, baseline_column_bytes=None):
    torch.manual_seed(0)
    compiled = torch.compile(reference.masked_conv2d, dynamic=False)
    rows = []
    for label, c_in, c_out, k, groups, h in [c for c in (QUICK_CASES if quick else CASES) if only in c[0]]:
        for layout, fmt in LAYOUTS.items():
            x = torch.randn(BATCH, c_in, h, h).contiguous(memory_format=fmt)
            w = torch.randn(c_out, c_in // groups, k, k).contiguous(memory_format=fmt)
            b = torch.randn(c_out)
            prev = torch.randn(BATCH, c_out, (h + 1) // 2, (h + 1) // 2).contiguous(memory_format=fmt)
            pad = k // 2
            conv_args = ((1, 1), (pad, pad), (1, 1), groups)
            masks = {d: (torch.rand(BATCH, 1, h, h) < d).float() for d in DENSITIES}
            full = masks[1.0]
            fns = {
                ("dense", None): lambda: aim_kernels.topdown_merge(F.conv2d(x, w, b, 1, pad, 1, groups), full, prev),
                ("torch.compile", None): lambda: compiled(x, w, b, full, prev, *conv_args),
            }
            for d, m in masks.items():
                op = lambda m=m: aim_kernels.masked_conv2d(x, w, b, m, prev, padding=pad, groups=groups)  # noqa: E731
                fns[("masked_conv2d", d)] = op
                fns[("sparse", d)] = sparse_forced(op)
                if baseline_column_bytes:  # the sparse kernel with another column budget, in the same rounds
                    fns[(f"sparse, {baseline_column_bytes} column bytes", d)] = sparse_forced(op, baseline_column_bytes)
            with torch.no_grad():
                stats = common.time_interleaved(fns, rounds=rounds)
            dense_ms, compile_ms = stats[("dense", None)]["median_ms"], stats[("torch.compile", None)]["median_ms"]
            for (provider, density), t in stats.items():
                speedup = dense_ms / t["median_ms"]
                rows.append({
                    "allocator": os.environ.get(common.CHILD_ENV_FLAG, "inherited"), "threads": torch.get_num_threads(),
                    "case": label, "shape": f"{BATCH}x{c_in}x{h}x{h} k{k} g{groups} -> {c_out}", "layout": layout,
                    "provider": provider, "density": density,
                    "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                    "x_vs_dense": speedup, "x_vs_compile": compile_ms / t["median_ms"],
                    "frac_of_ideal": speedup * density if density else None,
                })
    print(json.dumps(rows))


def crossovers(rows):
    """Per (allocator, case, layout): the lowest density at which the sparse kernel was not
    faster than dense (None: faster at every density measured)."""
    found = {}
    for r in rows:
        if r["provider"] != "sparse":
            continue
        key = (r["allocator"], r["case"], r["layout"])
        found.setdefault(key, None)
        if r["x_vs_dense"] <= 1.0 and (found[key] is None or r["density"] < found[key]):
            found[key] = r["density"]
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, for a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cases", default="", help="only the cases whose label contains this (e.g. target)")
    parser.add_argument("--baseline-column-bytes", type=int, default=None,
                        help="also time the sparse kernel with this column budget (AIM_KERNELS_MASKED_CONV_COLUMN_BYTES)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get(common.CHILD_ENV_FLAG):
        return child(args.quick, args.rounds, args.cases, args.baseline_column_bytes)
    rows = [r for part in common.run_under_both_allocators(__file__, sys.argv[1:]) for r in part]
    common.print_table(rows, ["allocator", "threads", "case", "layout", "provider", "density", "median_ms",
                              "x_vs_dense", "x_vs_compile", "frac_of_ideal"])
    print("crossover density (lowest measured density where the sparse kernel is not faster than dense):")
    for (allocator, case, layout), density in crossovers(rows).items():
        print(f"  {allocator} {case} {layout}: {density}")
    meta = common.machine_info()
    stem = ("masked_conv2d" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "")
            + (f"_{args.cases.replace(' ', '_')}" if args.cases else "")
            + (f"_vs_columns{args.baseline_column_bytes}" if args.baseline_column_bytes else ""))
    paths = common.write_results(stem, rows, meta)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
