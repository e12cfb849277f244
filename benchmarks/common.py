"""Shared benchmark machinery: timing, the machine's elementwise bandwidth, the two allocator
settings, and result files.

Every number is relative to something measured in the same process: the eager reference,
torch.compile of the reference, and torch.add(a, b, out=c) on large float32 tensors (this
machine's achievable elementwise bandwidth).
"""
import ctypes
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# glibc returns freed blocks above the mmap threshold to the OS and page-faults them back on
# the next allocation; for outputs of tens of MB that costs more than the kernel itself.
ALLOCATOR_SETTINGS = {
    "default-malloc": {},
    "no-alloc-faults": {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"},
}
CHILD_ENV_FLAG = "AIM_BENCH_ALLOCATOR"


def time_interleaved(fns, rounds=15, warmup=2):
    """Median and 20th/80th percentile wall time (ms) of each named zero-argument callable.

    Calls go round-robin (a, b, c, a, b, c, ...) so that load from other processes on this
    shared 2-core machine slows every provider alike and the ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    stats = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=10)
        stats[name] = {"median_ms": statistics.median(s), "p20_ms": q[1], "p80_ms": q[7], "reps": len(s)}
    return stats


BANDWIDTH_NUMEL = 16 * 256 * 56 * 56  # 51 MB per float32 tensor: far larger than the caches


def gpu_times(fn, rep_ms=100, profiled_calls=20):
    """Two timings (ms) of a zero-argument callable on the current CUDA device:
    - p20/median/p80 wall time of one call followed by a synchronize (triton do_bench): what a
      caller waits for, host-side launch overhead and host syncs included;
    - gpu_ms, the summed duration of the call's kernels, copies and memsets (torch.profiler,
      CUPTI timestamps, mean over profiled_calls calls): device time alone."""
    import triton.testing
    from torch.profiler import ProfilerActivity, profile
    p20, median, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled_calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.self_device_time_total for e in prof.key_averages())
    return {"p20_ms": p20, "median_ms": median, "p80_ms": p80, "gpu_ms": device_us / profiled_calls / 1e3}


GPU_SPEEDUPS = (("gpu_x_vs_eager", "eager"), ("gpu_x_vs_compile", "torch.compile"))  # add_speedups(..., time_key="gpu_ms")


def bandwidth_probe(numel=BANDWIDTH_NUMEL):
    """A callable for time_interleaved: torch.add(a, b, out=c) on float32, preallocated output,
    and the bytes it moves (read a and b, write c). Its GB/s is this machine's achievable
    elementwise bandwidth, measured alongside the providers."""
    a, b, c = (torch.randn(numel) for _ in range(3))
    return (lambda: torch.add(a, b, out=c)), 12 * numel


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
PEAK_MMAP_THRESHOLD = 64 * 1024


def peak_memory_mb(fns, device="cpu"):
    """Peak memory (MB) one call of each named callable adds on top of what is live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: the growth of the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) with glibc told to mmap every block of 64 KB
    or more and its free pages returned (malloc_trim) before each call, so that the resident
    set follows live tensors, C++ temporaries included. Call it after all timing in a process:
    the mallopt stays in force."""
    peaks = {}
    if torch.device(device).type == "cuda":
        for name, fn in fns.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 1e6
        return peaks
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, PEAK_MMAP_THRESHOLD)
    for name, fn in fns.items():
        fn()
        libc.malloc_trim(0)  # free heap pages (from before the mallopt) reused later would not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        fn()
        peaks[name] = (_status_kb("VmHWM") - base) * 1024 / 1e6
    return peaks


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _package_version():
    from importlib import metadata

    try:
        return metadata.version("aim-kernels")
    except metadata.PackageNotFoundError:
        return "source tree (not installed)"


def device_name(device="cpu"):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu"):
    """What every result file records: where, when, with what code."""
    return {
        "machine": platform.node(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "aim_kernels": _package_version(),
        "git_commit": _git_commit(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # other work on the machine skews absolute times (ratios within a run less so)
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }


def restart_without_allocation_faults():
    """Re-execute this script with ALLOCATOR_SETTINGS["no-alloc-faults"] in its environment
    unless it has them: glibc reads them at process start only."""
    missing = {k: v for k, v in ALLOCATOR_SETTINGS["no-alloc-faults"].items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **missing))


def run_under_both_allocators(script, extra_args):
    """Re-run `script` in a subprocess per allocator setting (they only take effect at process
    start); each child prints one JSON document on its last line."""
    results = []
    for name, env_changes in ALLOCATOR_SETTINGS.items():
        env = dict(os.environ, **env_changes, **{CHILD_ENV_FLAG: name})
        for key in set(ALLOCATOR_SETTINGS["no-alloc-faults"]) - set(env_changes):
            env.pop(key, None)
        proc = subprocess.run([sys.executable, script, *extra_args], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"benchmark child ({name}) failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def compact_json(value, depth=0):
    """JSON that stays small and diffs well: a long container that holds containers gets one
    line per element (down to depth 3), everything else is written on one line."""
    flat = json.dumps(value)
    nested = isinstance(value, (dict, list)) and any(isinstance(v, (dict, list)) for v in (value.values() if isinstance(value, dict) else value))
    if depth >= 3 or not nested or len(flat) <= 200:
        return flat
    indent = " " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{indent}{json.dumps(k)}: {compact_json(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return "[\n" + ",\n".join(indent + compact_json(v, depth + 1) for v in value) + "\n" + " " * depth + "]"


def write_json(path, value):
    with open(path, "w") as f:
        f.write(compact_json(value) + "\n")


def write_results(stem, rows, meta):
    """results/<stem>.json ({"meta", "rows"}, tracked) and .csv (every row with the meta's
    provenance columns: commit, time, version, device; written for spreadsheets, not tracked)."""
    provenance = {k: meta[k] for k in ("git_commit", "timestamp_utc", "aim_kernels", "device")}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    base = os.path.join(os.path.dirname(__file__), "results", stem)
    write_json(base + ".json", {"meta": meta, "rows": rows})
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(provenance))  # quotes fields that hold commas
        writer.writeheader()
        writer.writerows(dict(r, **provenance) for r in rows)
    return base + ".json", base + ".csv"


def no_grad_call(fn, *args):
    with torch.no_grad():
        return fn(*args)


def add_speedups(rows, baselines=(("x_vs_eager", "eager"), ("x_vs_compile", "torch.compile")), time_key="median_ms"):
    """Adds, to every row, its speed relative to each baseline provider measured for the same
    allocator setting, shape and mode (baseline time / row time, from rows[time_key])."""
    by_key = {(r["allocator"], r["shape"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        key = (r["allocator"], r["shape"], r["mode"])
        for column, provider in baselines:
            r[column] = by_key[key + (provider,)][time_key] / r[time_key]


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def usable_cuda_backends():
    """The CUDA backends of aim_kernels ("cuda", "triton") that can serve the ops on this machine."""
    import aim_kernels

    return [name for name in ("cuda", "triton") if aim_kernels.backends()[name]["available"]]
