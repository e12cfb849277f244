"""Shared benchmark machinery: timing, the machine's elementwise bandwidth, the two allocator
settings, and result files.

Every number is relative to something measured in the same process: the eager reference,
torch.compile of the reference, and torch.add(a, b, out=c) on large float32 tensors (this
machine's achievable elementwise bandwidth).
"""
import csv
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


def bandwidth_probe(numel=BANDWIDTH_NUMEL):
    """A callable for time_interleaved: torch.add(a, b, out=c) on float32, preallocated output,
    and the bytes it moves (read a and b, write c). Its GB/s is this machine's achievable
    elementwise bandwidth, measured alongside the providers."""
    a, b, c = (torch.randn(numel) for _ in range(3))
    return (lambda: torch.add(a, b, out=c)), 12 * numel


def machine_info():
    return {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


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


def write_results(stem, rows, meta):
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    base = os.path.join(os.path.dirname(__file__), "results", stem)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))  # quotes fields that hold commas
        writer.writeheader()
        writer.writerows(rows)
    return base + ".json", base + ".csv"


def no_grad_call(fn, *args):
    with torch.no_grad():
        return fn(*args)


def add_speedups(rows, baselines=(("x_vs_eager", "eager"), ("x_vs_compile", "torch.compile"))):
    """Adds, to every row, its speed relative to each baseline provider measured for the same
    allocator setting, shape and mode (baseline median / row median)."""
    by_key = {(r["allocator"], r["shape"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        key = (r["allocator"], r["shape"], r["mode"])
        for column, provider in baselines:
            r[column] = by_key[key + (provider,)]["median_ms"] / r["median_ms"]


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
