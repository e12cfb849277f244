"""Shared benchmark machinery: timing, the machine's elementwise bandwidth, the two allocator
settings, and result files.

Every number is relative to something measured in the same process: the eager reference,
torch.compile of the reference, and torch.add(a, b, out=c) on large float32 tensors (this
machine's achievable elementwise bandwidth).
"""
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


def time_ms(fn, warmup=3, reps=25, min_seconds=0.5):
    """Median and 20th/80th percentile wall time of fn() in ms, over at least `reps` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10 * reps:
            break
    q = statistics.quantiles(samples, n=10)
    return {"median_ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7], "reps": len(samples)}


def elementwise_bandwidth_gbs(numel=16 * 256 * 56 * 56):
    """GB/s of torch.add(a, b, out=c) on float32 tensors of `numel` (preallocated output):
    12 bytes moved per element."""
    a, b, c = (torch.randn(numel) for _ in range(3))
    t = time_ms(lambda: torch.add(a, b, out=c), reps=30)["median_ms"]
    return 12 * numel / (t * 1e-3) / 1e9


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
    keys = list(rows[0])
    with open(base + ".csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r[k]) for k in keys) + "\n")
    return base + ".json", base + ".csv"


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
