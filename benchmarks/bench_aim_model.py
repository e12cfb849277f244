"""Training-step time (forward + backward) of the AIM top-down pathway alone and of a whole AIM
model, fused ops vs the plain-PyTorch reference path, on CPU.

    python benchmarks/bench_aim_model.py [--quick]

A third pair times only the pathway's two ops (no convolutions), to show their share.
Both paths are the same module with the same parameters (``use_reference`` flipped), timed
interleaved in the same process, under both allocator settings (see common.py). Speed is
reported as the ratio reference / fused. Writes benchmarks/results/aim_model.{json,csv}.
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import aim  # noqa: E402
import aim_kernels  # noqa: E402
from aim.nn.topdown import reference_gumbel_binarize  # noqa: E402
from aim_kernels import reference as reference_ops  # noqa: E402

# Top-down pathway alone: ResNet-18 stage maps of a batch of 8 at 224x224 (56, 28, 14, 7),
# width 256, through all four stages; the masks keep about a quarter of the positions.
PATHWAY = dict(batch=8, channels=[64, 128, 256, 512], sizes=[56, 28, 14, 7], out_channels=256, depth=4)
# Whole model: AIM[2] on ResNet-18, batch 8 at 160x160 (small enough for a 2-core CPU).
MODEL = dict(backbone="resnet18", batch=8, image_size=160, depth=2)
QUICK_PATHWAY = dict(PATHWAY, batch=2, sizes=[28, 14, 7, 4])
QUICK_MODEL = dict(MODEL, batch=2, image_size=64)


def pathway_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        features = module(x)
        sum(f.mean() for f in features.values()).backward()
    return step


def ops_step(binarize, merge, laterals, logits):
    """Only the pathway's two ops (gumbel_binarize, topdown_merge) over every stage, on the
    lateral outputs and mask logits the convolutions would produce, forward and backward."""
    def step():
        prev, total = None, 0
        for lateral, logit in zip(reversed(laterals), reversed(logits)):
            prev = merge(lateral, binarize(logit, 1.0, training=True), prev)
            total = total + prev.mean()
        torch.autograd.grad(total, laterals + logits)
    return step


def model_step(model, images, labels, criterion):
    def step():
        model.zero_grad(set_to_none=True)
        criterion(model(images), labels, 0.25).total.backward()
    return step


def quarter_active(module):
    """Mask logits biased so about 25% of positions are active, as after annealing."""
    for estimator in module.mask_estimators:
        torch.nn.init.constant_(estimator.to_logit.bias, -1.1)  # sigmoid(-1.1) = 0.25


def child(quick, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = QUICK_PATHWAY if quick else PATHWAY
    fused = aim.FusedTopDownMask(cfg["channels"], cfg["out_channels"], depth=cfg["depth"])
    quarter_active(fused)
    reference = copy.deepcopy(fused)
    reference.use_reference = True
    x = {str(i): torch.randn(cfg["batch"], c, s, s) for i, (c, s) in enumerate(zip(cfg["channels"], cfg["sizes"]))}
    shape_p = f"{cfg['batch']}x{cfg['channels']}@{cfg['sizes']}->{cfg['out_channels']}"

    laterals = [torch.randn(cfg["batch"], cfg["out_channels"], s, s, requires_grad=True) for s in cfg["sizes"]]
    logits = [(torch.randn(cfg["batch"], 1, s, s) - 1.1).requires_grad_() for s in cfg["sizes"]]

    mcfg = QUICK_MODEL if quick else MODEL
    fused_model = aim.AIM(mcfg["backbone"], num_classes=2, depth=mcfg["depth"])
    quarter_active(fused_model.topdown)
    reference_model = copy.deepcopy(fused_model)
    reference_model.topdown.use_reference = True
    images = torch.randn(mcfg["batch"], 3, mcfg["image_size"], mcfg["image_size"])
    labels = torch.randint(0, 2, (mcfg["batch"],))
    criterion = aim.AIMLoss()
    shape_m = f"AIM[{mcfg['depth']}] {mcfg['backbone']} {mcfg['batch']}x3x{mcfg['image_size']}x{mcfg['image_size']}"

    fns = {
        ("ops only", shape_p, "fused"): ops_step(aim_kernels.gumbel_binarize, aim_kernels.topdown_merge, laterals, logits),
        ("ops only", shape_p, "reference"): ops_step(reference_gumbel_binarize, reference_ops.topdown_merge, laterals, logits),
        ("top-down pathway", shape_p, "fused"): pathway_step(fused, x),
        ("top-down pathway", shape_p, "reference"): pathway_step(reference, x),
        ("whole model", shape_m, "fused"): model_step(fused_model, images, labels, criterion),
        ("whole model", shape_m, "reference"): model_step(reference_model, images, labels, criterion),
    }
    stats = common.time_interleaved(fns, rounds=5 if quick else 15)
    rows = [{
        "allocator": os.environ.get(common.CHILD_ENV_FLAG, "inherited"), "threads": threads, "what": what, "shape": shape, "path": path,
        "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
    } for (what, shape, path), t in stats.items()]
    print(json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    # One intra-op thread by default: on this 2-core machine shared with other jobs, a second
    # thread makes every op wait at barriers for a descheduled peer, and the spread of the
    # timings (p20 vs p80) grows tenfold; one thread measures the kernels, not the scheduler.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the timed process")
    args = parser.parse_args()
    if os.environ.get(common.CHILD_ENV_FLAG):
        return child(args.quick, args.threads)
    rows = [r for part in common.run_under_both_allocators(__file__, sys.argv[1:]) for r in part]
    by_key = {(r["allocator"], r["what"], r["path"]): r for r in rows}
    for r in rows:
        r["reference_over_fused"] = by_key[(r["allocator"], r["what"], "reference")]["median_ms"] / by_key[(r["allocator"], r["what"], "fused")]["median_ms"]
    common.print_table(rows, ["allocator", "threads", "what", "shape", "path", "median_ms", "p20_ms", "p80_ms", "reference_over_fused"])
    paths = common.write_results("aim_model" + ("_quick" if args.quick else ""), rows, common.machine_info())
    print("wrote", *paths)


if __name__ == "__main__":
    main()
