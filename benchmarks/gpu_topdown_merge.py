"""topdown_merge on a GPU: both CUDA backends (C++ "cuda" and "triton") and eager PyTorch,
forward and forward+backward, timed with triton.testing.do_bench in the same run; GB/s of
the bytes each kernel must move, and that as a fraction of the device's peak DRAM bandwidth
(from its memory clock and bus width).

    PYTHONPATH=. python benchmarks/gpu_topdown_merge.py [--quick] [--csv benchmarks/results/gpu_topdown_merge.csv]

Needs a CUDA device; exits with a message (status 0) when there is none.
"""
import argparse
import csv
import os
import platform
import sys

import torch

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
    parser.add_argument("--csv", help="append rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    import triton.testing

    import aim_kernels
    from aim_kernels import _cuda_backend, reference

    peak = peak_bandwidth_gbs(0)
    rows = []
    for dtype in (torch.float32, torch.float16):
        for n, c, h, w, hp, wp in (QUICK_SHAPES if args.quick else SHAPES):
            feat = torch.randn(n, c, h, w, device="cuda", dtype=dtype, requires_grad=True)
            mask = torch.rand(n, 1, h, w, device="cuda", dtype=dtype, requires_grad=True)
            prev = torch.randn(n, c, hp, wp, device="cuda", dtype=dtype, requires_grad=True)
            grad = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
            providers = {"eager": reference.topdown_merge}
            for backend in _cuda_backend.CHOICES:
                if _cuda_backend.unavailable_reason(backend) is None:
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
                        run = lambda: fn(feat, mask, prev).backward(grad)  # noqa: E731
                    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                    gbs = bytes_moved(n, c, h, w, hp, wp, feat.element_size(), mode != "forward") / ms / 1e6
                    rows.append(dict(machine=platform.node(), device=torch.cuda.get_device_name(0), dtype=str(dtype),
                                     shape=f"{n}x{c}x{h}x{w} from {hp}x{wp}", provider=name, mode=mode,
                                     ms=round(ms, 4), gbs=round(gbs, 1), fraction_of_peak=round(gbs / peak, 3)))
                    print(f"{rows[-1]['shape']:<26} {str(dtype):<14} {mode:<17} {name:<7} {ms:8.4f} ms "
                          f"{gbs:8.1f} GB/s  {gbs / peak:6.1%} of peak {peak:.0f} GB/s")
    if args.csv:
        new = not os.path.exists(args.csv)
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
