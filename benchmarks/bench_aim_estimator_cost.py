"""What the mask estimators cost: AIM with the paper's estimators (dense, 3 residual blocks),
with 1 block (``mask_blocks=1``) and with separable estimators (``mask_estimator="separable"``),
against the plain torchvision classifier, in one process.

    python benchmarks/bench_aim_estimator_cost.py [--quick] [--rounds R] [--variants dense:3 dense:1 separable:3]

A training step and inference as in bench_backbones.py (AdamW step; eval-mode forward under
no_grad), batch 8, one thread, the default ``aim.AIM(name, num_classes=2, depth=2)`` but for
``mask_estimator`` and ``mask_blocks``; every variant timed round-robin (common.time_interleaved),
so load from other work hits all alike. Whether a cheaper estimator loses anything is the study's question
(docs/performance.md has its answer). Writes benchmarks/results/aim_estimator_cost[_quick].json.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_backbones import inference, train_step  # noqa: E402

import aim  # noqa: E402
from aim.app.profiling import plain_classifier  # noqa: E402

CASES = (("resnet18", 160), ("convnext_tiny", 224))
SETTINGS = dict(batch=8, rounds=7)
QUICK = dict(batch=2, rounds=2, image_size=64)


def parse_variant(text):
    """"KIND:BLOCKS" (e.g. separable:3) -> (kind, blocks)."""
    kind, sep, blocks = text.partition(":")
    if not sep or not blocks.isdigit():
        raise argparse.ArgumentTypeError(f"expected KIND:BLOCKS such as dense:3, got {text!r}")
    return kind, int(blocks)


def measure(name, image_size, variants, s):
    torch.manual_seed(0)
    models = {"plain": plain_classifier(name, 2, image_size)}
    models.update({f"aim, {kind}, {b} blocks": aim.AIM(name, num_classes=2, depth=2, mask_estimator=kind, mask_blocks=b)
                   for kind, b in variants})
    images = torch.randn(s["batch"], 3, image_size, image_size)
    labels = torch.randint(0, 2, (s["batch"],))
    steps = {(kind, "train step"): train_step(m.train(), images, labels, kind != "plain") for kind, m in models.items()}
    times = common.time_interleaved(steps, rounds=s["rounds"], warmup=1)
    for m in models.values():
        m.eval()
    times.update(common.time_interleaved({(kind, "inference"): inference(m, images) for kind, m in models.items()},
                                         rounds=s["rounds"], warmup=1))
    rows = []
    for what in ("train step", "inference"):
        plain = times[("plain", what)]["median_ms"]
        for kind in models:
            ms = times[(kind, what)]["median_ms"]
            rows.append({"backbone": name, "image_size": image_size, "batch": s["batch"], "what": what, "model": kind,
                         "median_ms": ms, "over_plain": ms / plain})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 at 64x64, 2 rounds, for a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--variants", type=parse_variant, nargs="+", default=[("dense", 3), ("dense", 1), ("separable", 3)],
                        metavar="KIND:BLOCKS", help="mask_estimator:mask_blocks of the AIM variants to time")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1, as bench_backbones.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = dict(QUICK if args.quick else SETTINGS)
    if args.rounds:
        s["rounds"] = args.rounds
    rows = []
    for name, size in CASES:
        rows += measure(name, s.get("image_size", size), args.variants, s)
        print(f"{name}: done", flush=True)
    common.print_table(rows, list(rows[0]))
    meta = {**common.machine_info(), "settings": s, "variants": [f"{k}:{b}" for k, b in args.variants]}
    print("wrote", *common.write_results("aim_estimator_cost" + ("_quick" if args.quick else ""), rows, meta))


if __name__ == "__main__":
    main()
