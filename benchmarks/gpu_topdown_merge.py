"""topdown_merge on a GPU: both CUDA backends (C++ "cuda" and "triton") and eager PyTorch,
and torch.compile of it, forward and forward+backward, in the same run. Two timings each
(common.gpu_times): wall time per call with a synchronize (launch overhead included: what an
eager caller waits for) and gpu_ms, the summed kernel time from the profiler (device time alone).
GB/s of the bytes each kernel must move, from gpu_ms, and that as a fraction of the device's
peak DRAM bandwidth (from its memory clock and bus width).

    PYTHONPATH=. python benchmarks/gpu_topdown_merge.py [--quick]

Writes benchmarks/results/gpu_topdown_merge.{json,csv} through common.write_results (the CPU
scripts' schema: median and 20/80th percentiles, peak memory, commit, time, version, device).
Needs a CUDA device; exits with a message (status 0) when there is none.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# AIM-sized stages (ConvNeXt-T at 224: strides 4/8/16 give 56/28/14; prev is the stage above).
SHAPES = [(16, 256, 56, 56, 28, 28), (16, 256, 28, 28, 14, 14), (16, 256, 14, 14, 7, 7)]
QUICK_SHAPES = [(2, 64, 28, 28, 14, 14)]


def peak_bandwidth_gbs(device):
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9  # DDR: two transfers per clock


def bytes_moved(n, c, h, w, hp, wp, element, backward):
    big, mask, prev = n * c * h * w * element, n * h * w * element, n * c * hp * wp * element
    forward = 2 * big + mask + prev  # feat, mask, prev in; out
    if not backward:
        return forward
    return forward + 3 * big + 2 * mask + prev  # + grad_out, feat in, mask in; grad_feat, grad_mask, grad_prev out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    import aim_kernels
    from aim_kernels import reference

    peak = peak_bandwidth_gbs(0)
    rows = []
    for dtype in (torch.float32, torch.float16):
        for n, c, h, w, hp, wp in (QUICK_SHAPES if args.quick else SHAPES):
            feat = torch.randn(n, c, h, w, device="cuda", dtype=dtype, requires_grad=True)
            mask = torch.rand(n, 1, h, w, device="cuda", dtype=dtype, requires_grad=True)
            prev = torch.randn(n, c, hp, wp, device="cuda", dtype=dtype, requires_grad=True)
            grad = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
            torch._dynamo.reset()  # a fresh compile per shape: recompiles would hit dynamo's limit
            providers = {"eager": reference.topdown_merge,
                         "torch.compile": torch.compile(reference.topdown_merge, dynamic=False)}
            for backend in common.usable_cuda_backends():
                providers[backend] = backend
            for name, provider in providers.items():
                if isinstance(provider, str):
                    aim_kernels.set_cuda_backend(provider)
                    fn = aim_kernels.topdown_merge
                else:
                    fn = provider
                for mode in ("forward", "forward+backward"):
                    if mode == "forward":
                        run = lambda: fn(feat.detach(), mask.detach(), prev.detach())  # noqa: E731
                    else:
                        run = lambda: torch.autograd.grad(fn(feat, mask, prev), (feat, mask, prev), grad)  # noqa: E731
                    times = common.gpu_times(run)
                    gbs = bytes_moved(n, c, h, w, hp, wp, feat.element_size(), mode != "forward") / times["gpu_ms"] / 1e6
                    rows.append(dict(allocator="cuda-caching", dtype=str(dtype), shape=f"{n}x{c}x{h}x{w}<-{hp}x{wp}",
                                     mode=mode, provider=name, **times,
                                     peak_MB=common.peak_memory_mb({0: run}, "cuda")[0],
                                     **{"GB/s": gbs, "frac_of_peak_bw": gbs / peak}))
    # speedups per dtype: add_speedups keys on (allocator, shape, mode), so fold the dtype into the shape
    for r in rows:
        r["shape"] = f"{r['shape']} {r.pop('dtype')}"
    common.add_speedups(rows)
    common.add_speedups(rows, common.GPU_SPEEDUPS, time_key="gpu_ms")
    common.print_table(rows, ["shape", "mode", "provider", "median_ms", "gpu_ms", "peak_MB", "GB/s", "frac_of_peak_bw",
                              "x_vs_eager", "x_vs_compile", "gpu_x_vs_eager", "gpu_x_vs_compile"])
    print(f"peak DRAM bandwidth from the memory clock and bus width: {peak:.0f} GB/s")
    paths = common.write_results("gpu_topdown_merge" + ("_quick" if args.quick else ""), rows, common.machine_info("cuda"))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
