"""Command line: ``python -m aim demo`` (train AIM on the toy task) and ``python -m aim profile``
(parameters and FLOPs AIM adds to a torchvision backbone)."""
import argparse
import json
import os
import sys
import time

import torch
from torch import nn


def main(argv=None):
    parser = argparse.ArgumentParser(prog="aim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small AIM model on a generated WaterBirds-like toy task")
    demo.add_argument("--out", default="aim_demo_out", help="output directory (metrics.json, masks.png)")
    demo.add_argument("--epochs", type=int, default=16)
    demo.add_argument("--anneal-epochs", type=int, default=6, help="epochs over which tau goes from 1.0 to --target")
    demo.add_argument("--target", type=float, default=0.25, help="mask-annealing target (fraction of active entries)")
    demo.add_argument("--depth", type=int, default=2, help="top-down stages (AIM[depth, target])")
    demo.add_argument("--train-size", type=int, default=2000)
    demo.add_argument("--test-size", type=int, default=1000)
    demo.add_argument("--image-size", type=int, default=64)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--spurious-correlation", type=float, default=0.9, help="P(background == class) in training")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--reference", action="store_true", help="use the plain-PyTorch reference ops instead of the fused ones")
    demo.add_argument("--baseline", action="store_true", help="also train the same backbone without AIM (GAP + linear) for comparison")
    # One thread by default: this model's ops are small, so on a 2-core machine shared with other
    # work a second intra-op thread mostly waits at barriers (measured 7x slower steps under load).
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op CPU threads (0: torch's default)")

    profile = commands.add_parser("profile", help="parameters and FLOPs AIM adds to a torchvision backbone")
    profile.add_argument("--backbone", default="convnext_tiny")
    profile.add_argument("--depth", type=int, default=2)
    profile.add_argument("--image-size", type=int, default=224)
    profile.add_argument("--num-classes", type=int, default=2)

    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)
    else:
        run_profile(args)
    return 0


def run_profile(args):
    from aim.profiling import added_cost

    cost = added_cost(args.backbone, depth=args.depth, image_size=args.image_size, num_classes=args.num_classes)
    print(f"AIM[{args.depth}] on {args.backbone} at {args.image_size}x{args.image_size}, {args.num_classes} classes")
    print(f"  parameters: plain {cost['plain_params'] / 1e6:.2f} M, AIM {cost['aim_params'] / 1e6:.2f} M, added {cost['added_params'] / 1e6:.2f} M")
    print(f"  FLOPs (torch.utils.flop_counter, 2 per multiply-add): plain {cost['plain_flops'] / 1e9:.2f} G, "
          f"AIM {cost['aim_flops'] / 1e9:.2f} G, added {cost['added_flops'] / 1e9:.3f} G "
          f"(= {cost['added_flops'] / 2e9:.3f} G multiply-adds, the convention of the paper's 4.5 G for ConvNeXt-T)")


def _evaluate(model, split, batch_size):
    import aim
    from aim import metrics
    from aim.data import batches

    model.eval()
    logits, masks = [], {}
    with torch.no_grad():
        for images, _, _ in batches(split, batch_size, shuffle=False):
            out = model(images)
            if isinstance(out, aim.AIMOutput):
                for name, mask in out.masks.items():
                    masks.setdefault(name, []).append(mask)
                out = out.logits
            logits.append(out)
    logits = torch.cat(logits)
    per_group, worst = metrics.group_accuracies(logits.argmax(1), split.labels, split.groups, 4)
    result = {"accuracy": metrics.accuracy(logits, split.labels), "worst_group_accuracy": worst, "group_accuracy": per_group}
    if masks:
        size = tuple(split.images.shape[-2:])
        result["mask_active_fraction"] = {k: metrics.mask_active_fraction(torch.cat(v)).mean().item() for k, v in masks.items()}
        result["energy_pointing_game"] = {k: metrics.energy_pointing_game(torch.cat(v), split.boxes, size).mean().item() for k, v in masks.items()}
    return result


def _per_stage(values):
    """Per-stage numbers as "a/b/...", stages finest first."""
    return "/".join(f"{v:.2f}" for v in values.values())


class _PlainClassifier(nn.Module):
    """The baseline: the same backbone, global average pool of its last stage, linear."""

    def __init__(self, backbone, channels, num_classes):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(channels, num_classes)

    def forward(self, images):
        return self.fc(self.backbone(images)[-1].mean(dim=(2, 3)))


def _cosine_decay(optimizer, epochs):
    """Learning rate decayed to zero over the run, per epoch: at a constant rate the test
    accuracy of this small task swings between epochs (0.52 to 0.94), so the last epoch,
    the one reported, would be a draw."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def _train_baseline(args, train, test, make_backbone):
    from aim.data import batches

    torch.manual_seed(args.seed)
    backbone = make_backbone()
    model = _PlainClassifier(backbone, backbone.widths[-1], 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    lr_decay = _cosine_decay(optimizer, args.epochs)
    shuffler = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.epochs):
        model.train()
        for images, labels, _ in batches(train, args.batch_size, shuffle=True, generator=shuffler):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        lr_decay.step()
    return _evaluate(model, test, args.batch_size)


def run_demo(args):
    import aim
    from aim import metrics
    from aim.backbones import SmallConvNet
    from aim.data import batches, make_toy_split
    from aim.visualize import save_mask_overlay
    import aim_kernels

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    train = make_toy_split(args.train_size, args.image_size, args.spurious_correlation, seed=args.seed)
    test = make_toy_split(args.test_size, args.image_size, 0.5, seed=args.seed + 10_000)
    train_agree = (train.labels == train.backgrounds).float().mean().item()
    print(f"toy task: class = object shape (disk / plus), background land / water agrees with the class in "
          f"{100 * train_agree:.0f}% of {len(train)} training images and {100 * (test.labels == test.backgrounds).float().mean().item():.0f}% "
          f"of {len(test)} test images ({args.image_size}x{args.image_size})")
    path = "reference (plain PyTorch)" if args.reference else "fused"
    print(f"ops: {path}; aim_kernels backends: " + ", ".join(k for k, v in aim_kernels.backends().items() if v["available"]))

    torch.manual_seed(args.seed)

    def make_backbone():
        return SmallConvNet((16, 32, 64, 128))

    model = aim.AIM(make_backbone(), num_classes=2, depth=args.depth, target=args.target, out_channels=64,
                    mask_hidden_channels=32, use_reference=args.reference)
    print(f"model: AIM[{args.depth}, {args.target:.0%}] on a 4-stage SmallConvNet, {sum(p.numel() for p in model.parameters()) / 1e3:.0f} k parameters")
    criterion = aim.AIMLoss()
    schedule = aim.MaskAnnealing.for_model(model, args.anneal_epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    lr_decay = _cosine_decay(optimizer, args.epochs)
    shuffler = torch.Generator().manual_seed(args.seed + 1)
    history = []
    print(f"{'epoch':>5} {'tau':>5} {'loss':>7} {'train acc':>9} {'train r_l':>14} | {'test acc':>8} {'worst grp':>9} {'test r_l':>14} {'EPG':>14} {'s':>5}")
    for epoch in range(args.epochs):
        tau = schedule(epoch)
        model.train()
        sums = {"loss": 0.0, "correct": 0, "seen": 0}
        active = {}
        for images, labels, _ in batches(train, args.batch_size, shuffle=True, generator=shuffler):
            out = model(images)
            loss = criterion(out, labels, tau).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item() * labels.shape[0]
            sums["correct"] += (out.logits.argmax(1) == labels).sum().item()
            sums["seen"] += labels.shape[0]
            for name, mask in out.masks.items():
                active[name] = active.get(name, 0.0) + metrics.mask_active_fraction(mask).sum().item()
        lr_decay.step()
        train_active = {k: v / sums["seen"] for k, v in active.items()}
        evaluation = _evaluate(model, test, args.batch_size)
        row = {"epoch": epoch, "tau": tau, "train_loss": sums["loss"] / sums["seen"], "train_accuracy": sums["correct"] / sums["seen"],
               "train_mask_active_fraction": train_active, "test": evaluation, "elapsed_s": time.perf_counter() - start}
        history.append(row)
        print(f"{epoch:>5} {tau:>5.2f} {row['train_loss']:>7.3f} {row['train_accuracy']:>9.3f} {_per_stage(train_active):>14} | "
              f"{evaluation['accuracy']:>8.3f} {evaluation['worst_group_accuracy']:>9.3f} {_per_stage(evaluation['mask_active_fraction']):>14} "
              f"{_per_stage(evaluation['energy_pointing_game']):>14} {row['elapsed_s']:>5.0f}", flush=True)

    box_fraction = metrics.box_area_fraction(test.boxes, tuple(test.images.shape[-2:])).mean().item()
    print(f"EPG of a mask that keeps everything (object box area / image area): {box_fraction:.2f}")
    summary = {"args": vars(args), "history": history, "uniform_mask_energy_pointing_game": box_fraction}
    if args.baseline:
        baseline = _train_baseline(args, train, test, make_backbone)
        summary["baseline_test"] = baseline
        print(f"baseline (same backbone, GAP + linear, no masks): test acc {baseline['accuracy']:.3f}, worst group {baseline['worst_group_accuracy']:.3f}")

    # Masks of test images whose background contradicts the class: where the shortcut misleads.
    model.eval()
    shown = torch.nonzero(test.labels != test.backgrounds).flatten()[:8]
    with torch.no_grad():
        out = model(test.images[shown])
    png = os.path.join(args.out, "masks.png")
    save_mask_overlay(test.images[shown], list(out.masks.values()), test.boxes[shown], png)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {png} (rows: test images whose background contradicts the class; columns: image, then the mask of "
          f"each top-down stage {list(out.masks)}, finest first; red: object box) and {os.path.join(args.out, 'metrics.json')}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
