"""``aim bench``: run every ``benchmarks/bench_*.py`` of a repository checkout, collect the
result files each writes (benchmarks/results/*.json and .csv), and plot the speedups.

The benchmark scripts are not part of the installed package (they import the package like any
user would, and they write into the checkout's benchmarks/results/), so ``aim bench`` needs a
checkout: run it from the repository root, or pass ``--benchmarks DIR``.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from aim.errors import UsageError

# Columns that identify a row, in label order.
IDENTITY = ("what", "shape", "mode", "provider", "path", "allocator", "threads")


# The script that times whole models per backbone; ``aim bench --backbones`` is passed on to it.
BACKBONES_SCRIPT = "bench_backbones.py"


def find_scripts(folder, only=None):
    """The folder and its bench_*.py scripts; ``only``: names (``backbones`` for bench_backbones.py) to keep."""
    folder = folder or os.path.join(os.getcwd(), "benchmarks")
    scripts = sorted(glob.glob(os.path.join(folder, "bench_*.py")))
    if not scripts:
        raise UsageError(f"no bench_*.py in {folder}: `aim bench` runs the benchmark scripts of a repository checkout "
                         f"(they are not installed with the package); run it from the repository root or pass --benchmarks DIR")
    if only:
        names = {os.path.basename(s)[len("bench_"):-len(".py")]: s for s in scripts}
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise UsageError(f"--only {' '.join(unknown)}: no such benchmark in {folder} (there: {', '.join(sorted(names))})")
        scripts = [names[name] for name in sorted(set(only))]
    return folder, scripts


def run_scripts(folder, scripts, quick, script_args=None):
    """Run each script in a fresh process (``script_args``: extra arguments by script file name);
    returns per script its time and the result files it wrote."""
    results_dir = os.path.join(folder, "results")
    runs = []
    for script in scripts:
        before = _mtimes(results_dir)
        command = [sys.executable, script] + (["--quick"] if quick else []) + (script_args or {}).get(os.path.basename(script), [])
        print(f"$ {' '.join(command)}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=os.path.dirname(folder))
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise UsageError(f"{script} failed with exit status {proc.returncode} (its output is above)")
        after = _mtimes(results_dir)
        written = sorted(p for p, t in after.items() if before.get(p) != t)
        runs.append({"script": os.path.basename(script), "seconds": seconds, "results": written})
    return runs


def _mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "*.csv"))}


def speedup_bars(rows):
    """(label, column, value) per speedup of the project's kernels in a result file's rows: the
    rows of provider "aim_kernels" (x_vs_eager, x_vs_compile) or path "fused"
    (reference_over_fused and other *_over_* ratios)."""
    bars = []
    for row in rows:
        if row.get("provider", row.get("path")) not in ("aim_kernels", "fused"):
            continue
        label = " ".join(str(row[k]) for k in IDENTITY if k in row and k not in ("provider", "path"))
        bars += [(label, column, float(value)) for column, value in row.items()
                 if (column.startswith("x_vs_") or "_over_" in column) and isinstance(value, (int, float))]
    return bars


def plot_speedups(result_files, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for file in result_files:
        with open(file) as f:
            bars = speedup_bars(json.load(f).get("rows", []))
        if bars:
            panels.append((os.path.basename(file), bars))
    if not panels:
        return False
    heights = [max(2.0, 0.22 * len(bars) + 1) for _, bars in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, bars) in zip(axes[:, 0], panels):
        columns = sorted({c for _, c, _ in bars})
        colours = {c: f"C{i}" for i, c in enumerate(columns)}
        ax.barh(range(len(bars)), [v for _, _, v in bars], color=[colours[c] for _, c, _ in bars])
        ax.set_yticks(range(len(bars)), [f"{label} [{c}]" for label, c, _ in bars], fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{name}: speedup (> 1: faster than the baseline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def command_bench(args):
    folder, scripts = find_scripts(args.benchmarks, args.only)
    runs = run_scripts(folder, scripts, args.quick, {BACKBONES_SCRIPT: ["--backbones", *args.backbones]} if args.backbones else None)
    os.makedirs(args.out, exist_ok=True)
    copied = []
    for run in runs:
        for file in run["results"]:
            copied.append(shutil.copy(file, args.out))
    with open(os.path.join(args.out, "runs.json"), "w") as f:
        json.dump({"quick": args.quick, "runs": runs}, f, indent=1)
    png = os.path.join(args.out, "speedups.png")
    plotted = plot_speedups([p for p in copied if p.endswith(".json")], png)
    for run in runs:
        print(f"{run['script']}: {run['seconds']:.0f} s, wrote {', '.join(os.path.basename(p) for p in run['results']) or 'nothing'}")
    print(f"copied {len(copied)} result files to {args.out}" + (f", plotted {png}" if plotted else ""))
