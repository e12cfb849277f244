"""Each speed change of AIM's module layer, before and after in one process, against the plain
classifier: AIM's train step and inference over the plain torchvision classifier's, the default
``aim.AIM(name, num_classes=2, depth=2)``, batch 8, one thread.

    python benchmarks/bench_aim_speedups.py [--quick] [--backbones NAME ...] [--rounds R] [--pathway-only]

Variants, all timed round-robin in the same process (common.time_interleaved):
- "plain": the torchvision classifier (aim.profiling.plain_classifier);
- "aim before": AIM with every speed switch of its mask estimators off (MaskEstimator's
  ``eval_channels_last`` and ``fold_batchnorm``), i.e. the computation as it was;
- "aim": AIM as shipped (the switches at their defaults);
- "plain channels_last", "aim channels_last": both models and the images in channels_last
  ("channels_last end to end": the user's choice of layout, applied to both alike).
A train step and inference as in bench_backbones.py; then "inference, pathway only": AIM's
top-down pathway alone on the backbone's stage maps, before and after, its aim_over_plain
1 + pathway / plain inference (what the pathway adds to the plain model). Writes
benchmarks/results/aim_speedups[_quick].{json,csv}.
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_backbones import inference, train_step  # noqa: E402

import aim  # noqa: E402
from aim.nn.backbones import build_backbone  # noqa: E402
from aim.app.profiling import plain_classifier  # noqa: E402

CASES = (("resnet18", 160), ("convnext_tiny", 224))
SETTINGS = dict(batch=8, depth=2, num_classes=2, rounds=7)
QUICK = dict(SETTINGS, batch=2, rounds=2, image_size=64)
SWITCHES = ("eval_channels_last", "fold_batchnorm")


def with_switches_off(model):
    before = copy.deepcopy(model)
    for estimator in before.topdown.mask_estimators:
        for switch in SWITCHES:
            setattr(estimator, switch, False)
    return before


def measure(name, image_size, s, rounds, pathway_only=False):
    torch.manual_seed(0)
    shipped = aim.AIM(build_backbone(name, stages_used=s["depth"]), num_classes=s["num_classes"], depth=s["depth"])
    plain = plain_classifier(name, s["num_classes"], image_size)
    cl = torch.channels_last
    models = {"plain": plain, "aim before": with_switches_off(shipped), "aim": shipped,
              "plain channels_last": copy.deepcopy(plain).to(memory_format=cl),
              "aim channels_last": copy.deepcopy(shipped).to(memory_format=cl)}
    images = torch.randn(s["batch"], 3, image_size, image_size)
    images_cl = images.contiguous(memory_format=cl)
    labels = torch.randint(0, s["num_classes"], (s["batch"],))
    rows = []
    for mode in () if pathway_only else ("train step", "inference"):
        steps = {}
        for kind, model in models.items():
            model.train(mode == "train step")
            x = images_cl if kind.endswith("channels_last") else images
            steps[kind] = train_step(model, x, labels, kind.startswith("aim")) if mode == "train step" else inference(model, x)
        times = common.time_interleaved(steps, rounds=rounds, warmup=1)
        ms = {kind: t["median_ms"] for kind, t in times.items()}
        for kind, t in times.items():
            baseline = "plain channels_last" if kind.endswith("channels_last") else "plain"
            rows.append({"backbone": name, "image_size": image_size, "batch": s["batch"], "mode": mode, "provider": kind,
                         "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                         "aim_over_plain": ms[kind] / ms[baseline], "before_over_this": ms["aim before"] / ms[kind]})
    rows += measure_pathway(name, models, images, s, rounds)
    return rows


def measure_pathway(name, models, images, s, rounds):
    """Inference of AIM's pathway alone (everything after the backbone) on the same stage maps,
    before and after, with the plain model's inference as the yardstick: the whole-model
    timings above cannot resolve a few percent on a loaded machine, this can (3x the rounds)."""
    from aim.nn.backbones import as_stage_dict

    shipped, before, plain = models["aim"].eval(), models["aim before"].eval(), models["plain"].eval()
    with torch.no_grad():
        stages = as_stage_dict(shipped.backbone(images))

    def after_backbone(model):
        def run():
            with torch.no_grad():
                model.topdown.pooled_outputs(stages)
        return run
    times = common.time_interleaved({"plain": inference(plain, images), "aim before": after_backbone(before),
                                     "aim": after_backbone(shipped)}, rounds=3 * rounds, warmup=2)
    ms = {kind: t["median_ms"] for kind, t in times.items()}
    return [{"backbone": name, "image_size": images.shape[-1], "batch": s["batch"], "mode": "inference, pathway only",
             "provider": kind, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
             "aim_over_plain": 1 + ms[kind] / ms["plain"] if kind != "plain" else 1.0,
             "before_over_this": ms["aim before"] / ms[kind] if kind != "plain" else None}
            for kind, t in times.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 at 64x64, for a smoke run")
    parser.add_argument("--backbones", nargs="+", default=[n for n, _ in CASES], metavar="NAME",
                        help="of %(default)s (each at its image size)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1, as bench_backbones.py)")
    parser.add_argument("--pathway-only", action="store_true", help="only the pathway-alone inference timing")
    args = parser.parse_args()
    common.restart_without_allocation_faults()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else SETTINGS
    sizes = dict(CASES)
    rows = []
    for name in args.backbones:
        rows += measure(name, s.get("image_size", sizes.get(name, 224)), s, args.rounds or s["rounds"], args.pathway_only)
        print(f"{name}: done", flush=True)
    common.print_table(rows, ["backbone", "image_size", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "aim_over_plain",
                              "before_over_this"])
    meta = {**common.machine_info(), "settings": s}
    print("wrote", *common.write_results("aim_speedups" + ("_pathway" if args.pathway_only else "") + ("_quick" if args.quick else ""), rows, meta))


if __name__ == "__main__":
    main()
