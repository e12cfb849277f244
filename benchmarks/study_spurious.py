"""AIM against its baseline under a spurious correlation, over seeds.

Embedded benchmark (default): pretrain SmallConvNet on the unbiased generated set (cached), then
for each spurious correlation (0.95, 1.0) and seed fine-tune the baseline and AIM from it,
select on val worst-group accuracy, and report test accuracy, worst-group accuracy, the EPG of
GradCAM (both models) and of AIM's masks; mean +- std over seeds into JSON, CSV and a PNG bar plot.

WaterBirds-layout folder: ``--data DIR --segmentations DIR [--weights PATH]`` runs the same
comparison on it (its own val / test splits; the correlation is whatever the folder has).

One experiment of the study (a variation of the recipe, recorded with its val and test numbers):
``--experiment NAME --set backbone_lr=0 --set target=0.35 ...``, appended to
``benchmarks/results/study_embedded_v2_experiments.json`` (the WaterBirds-structured benchmark;
``study_spurious_experiments.json`` holds the runs on the earlier one-shape-per-class task).

    PYTHONPATH=. python benchmarks/study_spurious.py                    # the full table
    PYTHONPATH=. python benchmarks/study_spurious.py --experiment blr0 --set backbone_lr=0 --correlations 1.0 --seeds 0
"""
import argparse
import ast
import csv
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from aim.app import study
from aim.data.embedded import FINETUNE_CLASSES

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

RESULTS = os.path.join(HERE, "results")
METRICS = ("weighted_accuracy", "accuracy", "worst_group", "unseen_accuracy", "epg_gradcam", "epg_mask_finest", "epg_mask_coarsest", "decision_object",
           "empty_max", "auc_class_extreme", "auc_background_extreme")


def parse_overrides(items):
    """--set key=value pairs (values as Python literals) for the fine-tuning recipe."""
    import dataclasses

    from aim.config import TrainConfig

    known = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("out", "model", "weights", "seed", "threads")]
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {item}: expected key=value with key one of {', '.join(known)}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def parse_class(text):
    """NAME=SHAPE[,SHAPE...] -> (name, shapes)."""
    name, sep, shapes = text.partition("=")
    if not sep or not name or not shapes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SHAPE[,SHAPE...]")
    return name, tuple(shapes.split(","))


def _extreme(values):
    """The value farthest from 0.5 (the stage whose mask area tells the most), None if none."""
    values = [v for v in values if v is not None]
    return max(values, key=lambda v: abs(v - 0.5)) if values else None


def flat_metrics(row):
    masks, leak = row["epg_masks"], row.get("mask_leak", {}).values()
    return {"weighted_accuracy": row.get("weighted_accuracy"), "accuracy": row["accuracy"], "worst_group": row["worst_group"],
            "unseen_accuracy": row.get("unseen_accuracy"), "epg_gradcam": row["epg_gradcam"],
            "epg_mask_finest": next(iter(masks.values()), None),
            "epg_mask_coarsest": list(masks.values())[-1] if masks else None,
            "decision_object": row.get("decision_object"),
            "empty_max": max((v["empty_share"] for v in leak), default=None),
            "auc_class_extreme": _extreme(v["auc_class"] for v in leak),
            "auc_background_extreme": _extreme(v["auc_background"] for v in leak)}


def pretrain_models(args, overrides, log, images="shapes"):
    """(backbone weights, AIM pathway weights or None, the backbone's pretraining val accuracy),
    pretrained on the unbiased set ``images`` (study.PRETRAINING_SETS) or taken from the cache."""
    # A backbone set for fine-tuning (--set backbone=timm:... [--set timm_kwargs=...]) is pretrained the same way.
    pretrain = study.PretrainSettings(image_size=args.image_size, seed=0, backbone=overrides.get("backbone", study.SMALL_BACKBONE),
                                      timm_kwargs=overrides.get("timm_kwargs"), lr=args.pretrain_lr, epochs=args.pretrain_epochs,
                                      images=images)
    weights, trained, pretrain_acc = study.pretrained_backbone(pretrain, threads=args.threads, log=log)
    log(f"pretrained backbone: {weights} ({'trained now' if trained else 'from the cache'}), "
        f"val accuracy {pretrain_acc:.3f} over the unbiased {images}")
    pathway = None
    if "aim" in args.models:
        pathway, trained, pathway_acc = study.pretrained_pathway(pretrain, weights, study.PathwaySettings(epochs=args.pathway_epochs),
                                                                 overrides, threads=args.threads, log=log)
        if pathway is not None:
            log(f"pretrained AIM pathway: {pathway} ({'trained now' if trained else 'from the cache'}), val accuracy {pathway_acc:.3f}")
    return weights, pathway, pretrain_acc


def run_embedded(args, overrides, log):
    weights, pathway, pretrain_acc = pretrain_models(args, overrides, log)
    records = []
    with tempfile.TemporaryDirectory(prefix="aim_study_") as tmp:
        for correlation in args.correlations:
            for seed in args.seeds:
                task = study.TaskSettings(image_size=args.image_size, spurious_correlation=correlation, seed=seed,
                                          classes=args.classes, area_range=args.area_range)
                train, val, test, unseen = study.task_splits(task)
                for kind in args.models:
                    log(f"correlation {correlation}, seed {seed}, {kind}")
                    record = study.finetune(kind, weights, train, val, test, os.path.join(tmp, kind), seed=seed,
                                            threads=args.threads, overrides=overrides, log=lambda *a: None, unseen=unseen,
                                            pathway_weights=pathway)
                    record.update(correlation=correlation, data="embedded", classes=args.classes or FINETUNE_CLASSES,
                                  pretrain_val_accuracy=pretrain_acc)
                    record["summary"] = study.summary_row(record)
                    log("  " + describe(record))
                    records.append(record)
    return records


def run_folder(args, overrides, log):
    from aim.data import open_split
    from aim.app.evaluate import evaluate
    from aim.config import TrainConfig
    from aim.app.train import fit
    from aim.checkpoint import read_checkpoint, model_from_checkpoint

    weights, pathway = args.weights, None
    if args.pretrain:  # the embedded benchmark's protocol: backbone and AIM's pathway pretrained on an unbiased set
        if "backbone" in overrides or args.backbone != study.SMALL_BACKBONE or args.weights != "none":
            raise SystemExit(f"--pretrain pretrains {study.SMALL_BACKBONE} and fine-tunes from it: pass --backbone "
                             f"{study.SMALL_BACKBONE} and no --weights")
        weights, pathway, _ = pretrain_models(args, overrides, log, images=args.pretrain)
        overrides = {"preprocessing": "raw", **({"pathway_weights": pathway} if pathway else {}), **overrides}
    # A folder of photographs goes through the ImageNet pipeline unless --set preprocessing=raw.
    settings = {**study.FINETUNE_DEFAULTS, "preprocessing": "imagenet", **overrides, "backbone": args.backbone}
    opened = dict(segmentations=args.segmentations, preprocessing=settings["preprocessing"])
    val = open_split(args.data, "val", args.image_size, **opened)
    test = open_split(args.data, "test", args.image_size, **opened)
    train = open_split(args.data, "train", args.image_size, augment=True, preprocessing=settings["preprocessing"])
    records = []
    with tempfile.TemporaryDirectory(prefix="aim_study_") as tmp:
        for seed in args.seeds:
            for kind in args.models:
                out = os.path.join(tmp, f"{kind}_{seed}")
                # The pretrained pathway is AIM's only (as study.finetune does); the baseline has none.
                ours = {k: v for k, v in settings.items() if kind == "aim" or k != "pathway_weights"}
                config = TrainConfig(out=out, model=kind, weights=weights, image_size=args.image_size, seed=seed,
                                     threads=args.threads, data=args.data, segmentations=args.segmentations, **ours)
                started = time.perf_counter()
                fit(config, train, val, log=lambda *a: None)
                checkpoint = read_checkpoint(os.path.join(out, "best.pt"))
                result = evaluate(model_from_checkpoint(checkpoint), test, batch_size=settings["batch_size"],
                                  group_weights=checkpoint["train_group_counts"])
                record = {"kind": kind, "settings": study.recorded_settings(config), "seed": seed, "best_epoch": checkpoint["epoch"],
                          "val": checkpoint["val"], "test": result, "time_s": time.perf_counter() - started,
                          "correlation": None, "data": args.data}
                record["summary"] = study.summary_row(record)
                log("  " + describe(record))
                records.append(record)
    return records


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def describe(record):
    s = record["summary"]
    masks = " ".join(f"{k}:{v:.3f}" for k, v in s["epg_masks"].items())
    placement = record["test"].get("mask_placement")
    kept = ""
    if placement:
        kept = " kept obj/bg (conflict) " + " ".join(
            f"{k}:{v['conflict']['object_kept']:.2f}/{v['conflict']['background_kept']:.2f}" for k, v in placement.items())
    leak = " ".join(f"{k}:empty {v['empty_share']:.3f} auc {v['auc_class']:.2f}/{v['auc_background']:.2f}"
                    for k, v in s.get("mask_leak", {}).items())
    decision = "" if s.get("decision_object") is None else f" on object {s['decision_object']:.3f}"
    return (f"{record['kind']:<8} seed {record['seed']} best epoch {s['best_epoch']}: val wg {s['val_worst_group']:.3f} | "
            f"test acc {s['accuracy']:.3f} weighted {_fmt(s.get('weighted_accuracy'))} wg {s['worst_group']:.3f} "
            f"unseen scenes {_fmt(s.get('unseen_accuracy'))} EPG gradcam {s['epg_gradcam']:.3f}"
            + (f" masks {masks}" if masks else "") + kept + decision + (f" leak {leak}" if leak else "")
            + f" ({record['time_s']:.0f} s)")


def aggregate(records):
    """mean and std over seeds per (correlation, model) of the flat metrics."""
    table = {}
    for r in records:
        table.setdefault((r["correlation"], r["kind"]), []).append(flat_metrics(r["summary"]))
    out = []
    for (correlation, kind), rows in table.items():
        entry = {"correlation": correlation, "model": kind, "seeds": len(rows)}
        for m in METRICS:
            values = [row[m] for row in rows if row[m] is not None]
            if values:
                entry[f"{m}_mean"] = statistics.fmean(values)
                entry[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def write_table(summary, stem):
    with open(f"{stem}.csv", "w", newline="") as f:
        fields = sorted({k for row in summary for k in row}, key=lambda k: (k not in ("correlation", "model", "seeds"), k))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correlations = sorted({row["correlation"] for row in summary}, key=str)
    bars = [("baseline", "worst_group", "baseline worst-group"), ("aim", "worst_group", "AIM worst-group"),
            ("baseline", "epg_gradcam", "baseline GradCAM EPG"), ("aim", "epg_gradcam", "AIM GradCAM EPG"),
            ("aim", "epg_mask_finest", "AIM mask EPG (finest stage)"),
            ("aim", "epg_mask_coarsest", "AIM mask EPG (coarsest stage)")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bars)
    for i, (kind, metric, label) in enumerate(bars):
        rows = [next((r for r in summary if r["correlation"] == c and r["model"] == kind), {}) for c in correlations]
        means = [r.get(f"{metric}_mean", 0.0) for r in rows]
        stds = [r.get(f"{metric}_std", 0.0) for r in rows]
        ax.bar([j + i * width for j in range(len(correlations))], means, width, yerr=stds, label=label, capsize=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(correlations))], [f"correlation {c}" for c in correlations])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("test, val-selected, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--correlations", type=float, nargs="+", default=[0.95, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["baseline", "aim"], choices=["baseline", "aim"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", nargs=2, default=None, type=parse_class, metavar="NAME=SHAPE[,SHAPE...]",
                        help="the two classes of the embedded task and their sub-shapes (default: FINETUNE_CLASSES)")
    parser.add_argument("--area-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="object area / image area of the embedded task (default: aim.data.embedded.AREA_RANGE)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-lr", type=float, default=study.PretrainSettings.lr,
                        help="learning rate of the backbone's pretraining (a ViT from scratch needs less than the CNN's)")
    parser.add_argument("--pretrain-epochs", type=int, default=study.PretrainSettings.epochs,
                        help="epochs of the backbone's pretraining (a transformer from scratch needs more than the CNN's)")
    parser.add_argument("--pathway-epochs", type=int, default=study.PathwaySettings.epochs,
                        help="epochs of AIM's pathway pretraining on the backbone's pretraining images (0: AIM's pathway starts new)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning setting (a TrainConfig field; defaults: aim.app.study.FINETUNE_DEFAULTS)")
    parser.add_argument("--experiment", help="record this run as one experiment of the study (appended to the experiments file)")
    parser.add_argument("--data", metavar="DIR", help="a WaterBirds-layout folder instead of the embedded benchmark")
    parser.add_argument("--segmentations", metavar="DIR", help="foreground masks of --data (for EPG)")
    parser.add_argument("--weights", default="none", help="backbone weights for --data (none, DEFAULT or a file)")
    parser.add_argument("--backbone", default="resnet50", help="backbone for --data")
    parser.add_argument("--pretrain", choices=study.PRETRAINING_SETS,
                        help="for --data: pretrain small_convnet and AIM's pathway on this unbiased set first (cached; "
                             "'photos': aim.data.photos.make_pretraining_split), fine-tune from them with preprocessing raw "
                             "(not with --weights)")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/study_spurious[_<name>])")
    args = parser.parse_args(argv)
    args.classes = dict(args.classes) if args.classes else None
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)

    def log(*a):
        print(*a, flush=True)

    started = time.perf_counter()
    records = run_folder(args, overrides, log) if args.data else run_embedded(args, overrides, log)
    summary = aggregate(records)
    meta = {"argv": sys.argv[1:], "overrides": overrides, "load_average": os.getloadavg(), "time_s": time.perf_counter() - started,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if args.experiment:
        path = os.path.join(RESULTS, "study_embedded_v2_experiments.json")
        existing = json.load(open(path)) if os.path.isfile(path) else []
        existing.append({"experiment": args.experiment, **meta, "summary": summary, "records": records})
        common.write_json(path, existing)
        log(f"appended experiment {args.experiment!r} to {path}")
    else:
        stem = args.out or os.path.join(RESULTS, "study_spurious" + ("_folder" if args.data else ""))
        common.write_json(f"{stem}.json", {**meta, "summary": summary, "records": records})
        write_table(summary, stem)
        log(f"wrote {stem}.json, .csv, .png")
    for row in summary:
        log(f"{str(row['correlation']):>5} {row['model']:<8} " + " ".join(
            f"{m} {row[m + '_mean']:.3f}±{row[m + '_std']:.3f}" for m in METRICS if m + "_mean" in row))


if __name__ == "__main__":
    main()
