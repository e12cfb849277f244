"""``aim demo``: AIM (and optionally the baseline) on the embedded WaterBirds-like task, through
the same training loop and evaluation as ``aim train`` / ``aim eval``."""
import json
import os
import shutil
import time

import torch

from aim.train import SMALL_BACKBONE, TrainConfig, fit


def run_demo(args):
    import aim_kernels
    from aim.data import make_toy_split
    from aim.evaluate import evaluate, format_table
    from aim.visualize import save_mask_overlay

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = make_toy_split(args.train_size, args.image_size, args.spurious_correlation, seed=args.seed)
    val = make_toy_split(args.test_size, args.image_size, 0.5, seed=args.seed + 20_000)
    test = make_toy_split(args.test_size, args.image_size, 0.5, seed=args.seed + 10_000)
    train_agree = (train.labels == train.backgrounds).float().mean().item()
    print(f"toy task: class = object shape (disk / plus), background land / water agrees with the class in "
          f"{100 * train_agree:.0f}% of {len(train)} training images; val and test ({len(test)} each) independent "
          f"({args.image_size}x{args.image_size})")
    print(f"ops: {'reference (plain PyTorch)' if args.reference else 'fused'}; aim_kernels backends: "
          + ", ".join(k for k, v in aim_kernels.backends().items() if v["available"]))
    datasets = {name: split.as_dataset() for name, split in (("train", train), ("val", val), ("test", test))}
    summary = {"args": vars(args)}
    for kind in ("aim", "baseline") if args.baseline else ("aim",):
        run = os.path.join(args.out, kind)
        shutil.rmtree(run, ignore_errors=True)  # the demo always starts afresh
        config = TrainConfig(out=run, model=kind, backbone=SMALL_BACKBONE, depth=args.depth, target=args.target,
                             topdown_channels=64, mask_channels=32, epochs=args.epochs, anneal_epochs=args.anneal_epochs,
                             batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, workers=0, seed=args.seed,
                             threads=args.threads, use_reference=args.reference)
        print(f"{kind}: {run}")
        model, history = fit(config, datasets["train"], datasets["val"])
        result = evaluate(model, datasets["test"], batch_size=args.batch_size)
        print(f"{kind}, last epoch, test split:\n" + format_table(result, datasets["test"].class_names, datasets["test"].group_names))
        summary[kind] = {"history": history, "test": result}
        if kind == "aim":
            aim_model = model
    box_fraction = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in test.boxes.tolist()]).float().mean().item() / args.image_size ** 2
    print(f"EPG of a map that keeps everything (object box area / image area): {box_fraction:.2f}")
    summary["uniform_map_energy_pointing_game"] = box_fraction

    # Masks of test images whose background contradicts the class: where the shortcut misleads.
    shown = torch.nonzero(test.labels != test.backgrounds).flatten()[:8]
    with torch.no_grad():
        out = aim_model.eval()(test.images[shown])
    png = os.path.join(args.out, "masks.png")
    save_mask_overlay(test.images[shown], list(out.masks.values()), test.boxes[shown], png)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {png} (rows: test images whose background contradicts the class; columns: image, then the mask of "
          f"each top-down stage {list(out.masks)}, finest first; red: object box) and {os.path.join(args.out, 'metrics.json')}")
    print(f"done in {time.perf_counter() - start:.0f} s")
