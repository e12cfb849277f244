"""End-to-end AIM evaluation forward: dense vs sparse vs the plain backbone, and where the time
goes, for resnet50 and convnext_tiny at 224x224, batch 8, AIM[2, 0.25], width 256.

    python benchmarks/bench_aim_sparse.py [--threads N] [--rounds R]

Providers, timed interleaved in one process (common.py), under both allocator settings:
- "backbone": the torchvision backbone's stage maps alone;
- "AIM dense": AIM eval forward with sparse_eval=False (lateral 1x1 convs, topdown_merge);
- "AIM sparse maps": the pathway's feature maps through masked_conv2d, then the classifiers
  (what FusedTopDownMask computes in eval);
- "AIM logits": AIM eval forward as shipped (sparse_eval=True): global averages only, no maps.
Parts, on the same stage maps: "mask estimators" (M_l and the threshold), "laterals+merge"
(dense T_l and topdown_merge given the masks), "masked_conv2d" (the same with the sparse op),
"pooled shortcut" (the logits route's weighted sums given the masks).
Weights are random, and the mask logit biases are set so each mask keeps 25% of its positions
on this batch (AIM's target; the untrained estimators' maps give the masks their structure).
Writes benchmarks/results/masked_conv2d_aim[_t<N>].{json,csv}.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import aim  # noqa: E402
import aim_kernels  # noqa: E402
from aim.nn.backbones import as_stage_dict  # noqa: E402
from aim.nn.topdown import pooled_lateral  # noqa: E402

TARGET = 0.25


def build(name):
    torch.manual_seed(0)
    model = aim.AIM(name, num_classes=2, depth=2, target=TARGET).eval()
    images = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        stages = as_stage_dict(model.backbone(images))
        run = list(stages)[-model.depth:]
        for estimator, stage in zip(model.topdown.mask_estimators, run):
            logits = estimator(stages[stage])
            estimator.to_logit.bias -= torch.quantile(logits.flatten(), 1 - TARGET)
    return model, images, stages, run


def providers(model, images, stages, run):
    td = model.topdown
    masks = {name: aim_kernels.gumbel_binarize(est(stages[name]), 1.0, training=False) for est, name in zip(td.mask_estimators, run)}

    def with_sparse(flag, fn):
        def call():
            td.sparse_eval = flag
            return fn()
        return call

    def sparse_maps():
        result = td.run(as_stage_dict(model.backbone(images)), pool_stage_outputs=True)
        return model.classifier(next(iter(result.features.values())).mean(dim=(2, 3)))

    def estimators():
        return [aim_kernels.gumbel_binarize(est(stages[name]), 1.0, training=False) for est, name in zip(td.mask_estimators, run)]

    def laterals_merge(sparse):
        prev = None
        for i in reversed(range(len(run))):
            stage, mask, conv = stages[run[i]], masks[run[i]], td.lateral[i]
            if sparse:
                prev = aim_kernels.masked_conv2d(stage, conv.weight, conv.bias, mask, prev)
            else:
                prev = aim_kernels.topdown_merge(conv(stage), mask, prev)
        return prev

    def pooled_shortcut():
        return [pooled_lateral(td.lateral[i], stages[name], masks[name]) for i, name in enumerate(run)]

    fns = {
        "backbone": lambda: model.backbone(images),
        "AIM dense": with_sparse(False, lambda: model(images)),
        "AIM sparse maps": with_sparse(True, sparse_maps),
        "AIM logits": with_sparse(True, lambda: model(images)),
        "part: mask estimators": estimators,
        "part: laterals+merge": lambda: laterals_merge(False),
        "part: masked_conv2d": lambda: laterals_merge(True),
        "part: pooled shortcut": pooled_shortcut,
    }
    density = {name: m.mean().item() for name, m in masks.items()}
    return fns, density


def child(rounds):
    rows = []
    for name in ("resnet50", "convnext_tiny"):
        model, images, stages, run = build(name)
        fns, density = providers(model, images, stages, run)
        with torch.no_grad():
            stats = common.time_interleaved(fns, rounds=rounds, warmup=1)
        dense = stats["AIM dense"]["median_ms"]
        for provider, t in stats.items():
            rows.append({
                "allocator": os.environ.get(common.CHILD_ENV_FLAG, "inherited"), "threads": torch.get_num_threads(),
                "backbone": name, "provider": provider, "mask_density": json.dumps({k: round(v, 3) for k, v in density.items()}),
                "stage_sizes": json.dumps({k: list(stages[k].shape[1:]) for k in run}),
                "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                "share_of_AIM_dense": t["median_ms"] / dense, "x_vs_AIM_dense": dense / t["median_ms"],
            })
    print(json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get(common.CHILD_ENV_FLAG):
        return child(args.rounds)
    rows = [r for part in common.run_under_both_allocators(__file__, sys.argv[1:]) for r in part]
    common.print_table(rows, ["allocator", "threads", "backbone", "provider", "median_ms", "share_of_AIM_dense", "x_vs_AIM_dense"])
    print("mask densities:", {r["backbone"]: r["mask_density"] for r in rows})
    meta = common.machine_info()
    paths = common.write_results("masked_conv2d_aim" + (f"_t{args.threads}" if args.threads else ""), rows, meta)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
