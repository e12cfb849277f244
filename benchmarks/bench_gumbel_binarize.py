"""Speed and saved-for-backward memory of gumbel_binarize against eager PyTorch,
F.gumbel_softmax and torch.compile, forward and forward+backward, at AIM mask sizes.

    python benchmarks/bench_gumbel_binarize.py [--quick] [--threads N]

Providers (all in training mode, temperature 1, float32, fresh noise every call):
  eager          torch.rand + log + sigmoid + threshold + the detach trick (hard - soft.detach() + soft)
  gumbel_softmax F.gumbel_softmax(hard=True) over two channels [a, 0] (its channel-0 output is the
                 binary Gumbel-softmax of a: the difference of two Gumbels is logistic)
  torch.compile  torch.compile of `eager`
  aim_kernels    aim_kernels.gumbel_binarize (seed=None: one seed drawn per call, noise in-kernel)
Every provider runs under both allocator settings (see common.py), timed round-robin in one
process; speed is reported as ratios against eager in the same run. Saved-for-backward bytes
are counted with torch.autograd.graph.saved_tensors_hooks (distinct storages packed by one
forward; saved_new_bytes leaves out logits' own storage). --threads sets torch's intra-op
threads for every provider (default: torch's default); on a loaded machine one thread avoids
stalls of a whole scheduler time slice when a second worker thread is descheduled.
Writes benchmarks/results/gumbel_binarize[_quick][_tN].{json,csv}.
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

CASES = [(64, 1, 112, 112), (256, 1, 56, 56)]
QUICK_CASES = [(8, 1, 56, 56)]


def eager_straight_through(logits, temperature=1.0):
    """The eager baseline: logistic noise from torch.rand, hard threshold, detach trick."""
    u = torch.rand_like(logits)
    noise = torch.log(u) - torch.log(1 - u)
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (logits + noise >= 0).to(logits.dtype)
    return hard - soft.detach() + soft


def gumbel_softmax_two_channels(logits, temperature=1.0):
    two = torch.cat([logits, torch.zeros_like(logits)], dim=1)
    return F.gumbel_softmax(two, tau=temperature, hard=True, dim=1)[:, :1]


def ours(logits, temperature=1.0):
    return aim_kernels.gumbel_binarize(logits, temperature)


def saved_bytes(fn, logits):
    """(all, new): bytes of the distinct storages autograd saves for backward during one
    forward, and of those other than logits' own (memory the forward allocates only for
    backward; saving logits itself just keeps the input alive)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits)
    new = sum(n for ptr, n in storages.items() if ptr != logits.untyped_storage().data_ptr())
    return sum(storages.values()), new


def child(quick, threads):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    compiled = torch.compile(eager_straight_through, dynamic=False)
    providers = {"eager": eager_straight_through, "gumbel_softmax": gumbel_softmax_two_channels,
                 "torch.compile": compiled, "aim_kernels": ours}
    rows, pending_peaks = [], []
    for shape in QUICK_CASES if quick else CASES:
        logits = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        fns = {}
        for name, fn in providers.items():
            # this shape's tensors bound now: peak memory is measured after the loop
            fns[(name, "forward")] = lambda fn=fn, x=logits: common.no_grad_call(fn, x)
            fns[(name, "forward+backward")] = lambda fn=fn, x=logits, g=grad: torch.autograd.grad(fn(x), x, g)
        stats = common.time_interleaved(fns, rounds=8 if quick else 30, warmup=3)
        pending_peaks.append((fns, by_key := {}))
        memory = {name: saved_bytes(fn, logits) for name, fn in providers.items()}
        for (name, mode), t in stats.items():
            rows.append(by_key.setdefault((name, mode), {
                "allocator": os.environ.get(common.CHILD_ENV_FLAG, "inherited"), "threads": torch.get_num_threads(),
                "shape": "x".join(map(str, shape)), "mode": mode, "provider": name,
                "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"], "peak_MB": None,
                "saved_bytes": memory[name][0], "saved_new_bytes": memory[name][1],
                "logits_bytes": logits.numel() * logits.element_size(),
            }))
    for fns, by_key in pending_peaks:  # after all timing: peak_memory_mb changes the allocator's settings
        for key, megabytes in common.peak_memory_mb(fns).items():
            by_key[key]["peak_MB"] = megabytes
    print(json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, for a smoke run")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if os.environ.get(common.CHILD_ENV_FLAG):
        return child(args.quick, args.threads)
    rows = [r for part in common.run_under_both_allocators(__file__, sys.argv[1:]) for r in part]
    common.add_speedups(rows)
    for r in rows:
        r["saved_vs_logits"] = r["saved_bytes"] / r["logits_bytes"]
    common.print_table(rows, ["allocator", "threads", "shape", "mode", "provider", "median_ms", "p20_ms", "p80_ms",
                              "x_vs_eager", "x_vs_compile", "peak_MB", "saved_bytes", "saved_new_bytes"])
    stem = "gumbel_binarize" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "")
    paths = common.write_results(stem, rows, common.machine_info())
    print("wrote", *paths)


if __name__ == "__main__":
    main()
