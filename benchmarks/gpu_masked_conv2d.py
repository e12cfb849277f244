"""masked_conv2d on a GPU: the sparse kernels of both CUDA backends (C++ "cuda": compaction,
gather, cuBLAS, scatter-merge; "triton": one fused implicit-GEMM kernel) against the dense
composition (cuDNN conv2d + topdown_merge) and torch.compile of it, at the stage shapes of
ResNet-50 and ConvNeXt-T at 224x224, batch 8 (or --batch), in float32 and bfloat16, both layouts.

    PYTHONPATH=. python benchmarks/gpu_masked_conv2d.py [--quick] [--batch N]

Timed with triton.testing.do_bench (wall time of a call followed by a device synchronize):
the sparse path needs the number of active positions on the host (one device-to-host copy
per call), so it cannot be captured in a CUDA graph, and the time a caller waits is the cost
that decides between sparse and dense. Providers per (case, layout, dtype, backend): "dense",
"torch.compile" (of the dense composition, dynamic shapes), and at each density 0.05 .. 1.0
"masked_conv2d" (as shipped: the dense composition above the crossover) and "sparse" (the
sparse kernels at every density, AIM_KERNELS_MASKED_CONV_DENSE_ABOVE=2). Reported: speedup
over dense and torch.compile, the fraction of the ideal 1/density, and per case the crossover
density (the lowest measured density where the sparse kernel is not faster than dense).
Writes benchmarks/results/gpu_masked_conv2d[_quick][_bN].{json,csv} (_bN for a batch other than 8). Needs a CUDA device.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_masked_conv2d import BATCH, CASES, DENSITIES, LAYOUTS, QUICK_CASES, crossovers, sparse_forced  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, for a smoke run")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    import triton.testing

    import aim_kernels
    from aim_kernels import reference

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # the dense baseline at its best
    compiled = torch.compile(reference.masked_conv2d, dynamic=True)
    backends = common.usable_cuda_backends()
    rows = []
    for dtype in DTYPES:
        for label, c_in, c_out, k, groups, h in QUICK_CASES if args.quick else CASES:
            for layout, fmt in LAYOUTS.items():
                def make(*shape):
                    return torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                x, w, prev = make(args.batch, c_in, h, h), make(c_out, c_in // groups, k, k), make(args.batch, c_out, (h + 1) // 2, (h + 1) // 2)
                b = torch.randn(c_out, device="cuda", dtype=dtype)
                pad = k // 2
                masks = {d: (torch.rand(args.batch, 1, h, h, device="cuda") < d).to(dtype) for d in DENSITIES}
                full = masks[1.0]
                compile_ms = triton.testing.do_bench(lambda: compiled(x, w, b, full, prev, (1, 1), (pad, pad), (1, 1), groups),
                                                     warmup=10, rep=40)
                for backend in backends:
                    aim_kernels.set_cuda_backend(backend)
                    fns = {("dense", None): lambda: aim_kernels.topdown_merge(F.conv2d(x, w, b, 1, pad, 1, groups), full, prev)}
                    for d, m in masks.items():
                        op = lambda m=m: aim_kernels.masked_conv2d(x, w, b, m, prev, padding=pad, groups=groups)  # noqa: E731
                        fns[("masked_conv2d", d)] = op
                        fns[("sparse", d)] = sparse_forced(op)
                    with torch.no_grad():
                        times = {key: triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.2, 0.5, 0.8])
                                 for key, fn in fns.items()}
                    dense_ms = times[("dense", None)][1]
                    for (provider, density), (p20, median, p80) in [*times.items(), (("torch.compile", None), (None, compile_ms, None))]:
                        speedup = dense_ms / median
                        rows.append({
                            "allocator": f"cuda-caching/{backend}", "dtype": str(dtype).removeprefix("torch."),
                            "case": label, "shape": f"{args.batch}x{c_in}x{h}x{h} k{k} g{groups} -> {c_out}", "layout": layout,
                            "provider": provider, "density": density, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                            "x_vs_dense": speedup, "x_vs_compile": compile_ms / median,
                            "frac_of_ideal": speedup * density if density else None,
                        })
    common.print_table(rows, ["allocator", "dtype", "case", "layout", "provider", "density", "median_ms",
                              "x_vs_dense", "x_vs_compile", "frac_of_ideal"])
    print("crossover density (lowest measured density where the sparse kernel is not faster than dense):")
    for dtype in DTYPES:
        for (backend, case, layout), density in crossovers([r for r in rows if r["dtype"] == str(dtype).removeprefix("torch.")]).items():
            print(f"  {backend} {dtype} {case} {layout}: {density}")
    paths = common.write_results("gpu_masked_conv2d" + ("_quick" if args.quick else "") + (f"_b{args.batch}" if args.batch != BATCH else ""), rows, common.machine_info("cuda"))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
