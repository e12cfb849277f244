"""What AIM adds to each backbone, torchvision's and timm's, CNNs and transformers: parameters
and FLOPs at 224x224 (aim.app.profiling.added_cost, as `aim profile` prints them), and the time of
a training step and of inference of AIM[2] against the plain classifier, on this machine.

    python benchmarks/bench_backbones.py [--quick] [--backbones NAME ...] [--threads 1]

A training step: forward, loss (AIMLoss at tau 0.25 for AIM; cross-entropy for the plain
classifier), backward, AdamW step, on a batch of random images (only time is measured).
Inference: an eval-mode forward under no_grad (AIM's sparse evaluation path, its default).
AIM and the plain model are timed interleaved in the same process (common.time_interleaved),
so load from other work hits both alike. Writes benchmarks/results/backbones[_quick].{json,csv}.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import aim  # noqa: E402
from aim.nn.backbones import build_backbone  # noqa: E402
from aim.app.profiling import added_cost, plain_classifier  # noqa: E402

BACKBONES = ("resnet18", "resnet50", "convnext_tiny", "timm:resnet18", "timm:convnext_atto",
             "timm:swin_tiny_patch4_window7_224", "timm:vit_tiny_patch16_224")
SETTINGS = dict(image_size=224, batch=2, depth=2, num_classes=2, rounds=5)
QUICK = dict(SETTINGS, image_size=64, rounds=2)


def train_step(model, images, labels, is_aim):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = aim.AIMLoss()

    def step():
        output = model(images)
        loss = criterion(output, labels, 0.25).total if is_aim else torch.nn.functional.cross_entropy(output, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def inference(model, images):
    def run():
        with torch.no_grad():
            model(images)
    return run


def measure(name, s):
    cost = added_cost(name, depth=s["depth"], image_size=s["image_size"], num_classes=s["num_classes"])
    torch.manual_seed(0)
    backbone = build_backbone(name, stages_used=s["depth"], image_size=s["image_size"])
    models = {"aim": aim.AIM(backbone, num_classes=s["num_classes"], depth=s["depth"]),
              "plain": plain_classifier(name, s["num_classes"], s["image_size"])}
    images = torch.randn(s["batch"], 3, s["image_size"], s["image_size"])
    labels = torch.randint(0, s["num_classes"], (s["batch"],))
    steps = {}
    for kind, model in models.items():
        steps[("train step", kind)] = train_step(model.train(), images, labels, kind == "aim")
    times = common.time_interleaved(steps, rounds=s["rounds"], warmup=1)
    for model in models.values():
        model.eval()
    times.update(common.time_interleaved({("inference", kind): inference(model, images) for kind, model in models.items()},
                                         rounds=s["rounds"], warmup=1))
    row = {"backbone": name, "threads": torch.get_num_threads(), "image_size": s["image_size"], "batch": s["batch"], "depth": s["depth"],
           "plain_params_M": cost["plain_params"] / 1e6, "added_params_M": cost["added_params"] / 1e6,
           "plain_GFLOPs": cost["plain_flops"] / 1e9, "added_GFLOPs": cost["added_flops"] / 1e9}
    for what in ("train step", "inference"):
        aim_ms, plain_ms = times[(what, "aim")]["median_ms"], times[(what, "plain")]["median_ms"]
        key = what.replace(" ", "_")
        row.update({f"{key}_plain_ms": plain_ms, f"{key}_aim_ms": aim_ms, f"{key}_aim_over_plain": aim_ms / plain_ms})
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64 images and 2 rounds, for a smoke run")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), metavar="NAME",
                        help="torchvision names or timm:NAME (default: %(default)s)")
    # One thread by default, as bench_aim_model.py: on a 2-core machine shared with other work, a
    # second thread mostly waits at barriers for a descheduled peer and the spread grows.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else SETTINGS
    rows = []
    for name in args.backbones:
        rows.append(measure(name, s))
        print(f"{name}: done", flush=True)
    common.print_table(rows, list(rows[0]))
    meta = {**common.machine_info(), "settings": s}
    print("wrote", *common.write_results("backbones" + ("_quick" if args.quick else ""), rows, meta))


if __name__ == "__main__":
    main()
