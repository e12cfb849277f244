"""gumbel_binarize on a GPU: both CUDA backends (C++ "cuda" and "triton") against eager
PyTorch, F.gumbel_softmax and torch.compile (the providers of bench_gumbel_binarize.py),
forward and forward+backward, training mode, float32 and bfloat16, at AIM mask sizes.

    PYTHONPATH=. python benchmarks/gpu_gumbel_binarize.py [--quick]

Two timings each (common.gpu_times): wall time per call with a synchronize, and gpu_ms, the
summed kernel time from the profiler. GB/s from gpu_ms over the bytes the op must move (logits
in and mask out; backward: grad_out and logits in, grad out), and saved-for-backward bytes.
Writes benchmarks/results/gpu_gumbel_binarize[_quick].{json,csv}. Needs a CUDA device.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_gumbel_binarize import CASES, QUICK_CASES, eager_straight_through, gumbel_softmax_two_channels, ours, saved_bytes  # noqa: E402
from gpu_topdown_merge import peak_bandwidth_gbs  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, for a smoke run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    import aim_kernels

    torch.manual_seed(0)
    peak = peak_bandwidth_gbs(0)
    providers = {"eager": eager_straight_through, "gumbel_softmax": gumbel_softmax_two_channels, "torch.compile": None}
    cuda_backends = common.usable_cuda_backends()
    providers.update({backend: ours for backend in cuda_backends})
    rows = []
    for dtype in DTYPES:
        for shape in QUICK_CASES if args.quick else CASES:
            torch._dynamo.reset()  # a fresh compile per shape: recompiles would hit dynamo's limit
            providers["torch.compile"] = torch.compile(eager_straight_through, dynamic=False)
            logits = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            grad = torch.randn(shape, device="cuda", dtype=dtype)
            for name, fn in providers.items():
                if name in cuda_backends:
                    aim_kernels.set_cuda_backend(name)
                for mode in ("forward", "forward+backward"):
                    if mode == "forward":
                        run = lambda fn=fn: common.no_grad_call(fn, logits)  # noqa: E731
                    else:
                        run = lambda fn=fn: torch.autograd.grad(fn(logits), logits, grad)  # noqa: E731
                    times = common.gpu_times(run)
                    moved = logits.numel() * logits.element_size() * (2 if mode == "forward" else 5)
                    gbs = moved / times["gpu_ms"] / 1e6
                    rows.append(dict(allocator="cuda-caching", shape=f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}",
                                     mode=mode, provider=name, **times, peak_MB=common.peak_memory_mb({0: run}, "cuda")[0],
                                     saved_bytes=saved_bytes(fn, logits)[0],
                                     **{"GB/s": gbs, "frac_of_peak_bw": gbs / peak}))
    common.add_speedups(rows)
    common.add_speedups(rows, common.GPU_SPEEDUPS, time_key="gpu_ms")
    common.print_table(rows, ["shape", "mode", "provider", "median_ms", "gpu_ms", "peak_MB", "saved_bytes", "GB/s",
                              "frac_of_peak_bw", "x_vs_eager", "x_vs_compile", "gpu_x_vs_eager", "gpu_x_vs_compile"])
    print(f"peak DRAM bandwidth from the memory clock and bus width: {peak:.0f} GB/s")
    paths = common.write_results("gpu_gumbel_binarize" + ("_quick" if args.quick else ""), rows, common.machine_info("cuda"))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
