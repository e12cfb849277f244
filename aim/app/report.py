"""``aim report``: the audit of a trained run as one self-contained HTML page (images and plots
as data URIs, no script, no network): the run, accuracy per group, training curves, the audit
(decision on the object, the mask-area leak, the pointing game), explanation quality (grid
pointing game, deletion and insertion) and mask galleries per group.

Every number comes from :func:`aim.app.evaluate.evaluate` (the code of ``aim eval``) and
:mod:`aim.analysis.faithfulness`; the pictures from :func:`aim.app.explain.explain_image` (the code of
``aim explain``). The page is rendered in memory and written with one rename, so a failed run
leaves no half-written report.
"""
import base64
import dataclasses
import io
import json
import os

import torch
import torch.nn.functional as F

from aim.analysis import faithfulness
from aim.errors import DataError, UsageError
from aim.app.evaluate import evaluate, format_number, open_split_for
from aim.nn.model import logits_of

# Small images (the embedded benchmark's 64 px) are enlarged by whole pixels to about this size.
PANEL_PIXELS = 128


@dataclasses.dataclass
class ReportSettings:
    gallery_per_group: int = 6          # images per group in the mask galleries
    background_images: int = 8          # images whose decision rests most on the background
    faithfulness_per_group: int = 25    # images per group for deletion / insertion and the grids
    steps: int = 16                     # deletion / insertion steps
    grids: int = 32                     # grids of the grid pointing game
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"


@dataclasses.dataclass
class Run:
    """A run folder of ``aim train``: its checkpoint, settings, history and model."""

    folder: str
    checkpoint_path: str
    checkpoint: dict
    config: dict        # config.json (settings, package version and commit), else the checkpoint's
    history: list       # log.jsonl: one row per epoch
    model: torch.nn.Module

    @property
    def label(self):
        return "AIM" if self.config["model"] == "aim" else "baseline"


def load_run(folder, checkpoint="best", device="cpu"):
    """The run in ``folder`` with its best.pt (or last.pt); UsageError naming the missing file."""
    from aim.checkpoint import read_checkpoint, model_from_checkpoint

    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder (a run folder of `aim train`)")
    path = os.path.join(folder, f"{checkpoint}.pt")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file (a run folder of `aim train` holds best.pt and last.pt)")
    loaded = read_checkpoint(path)
    config = {**loaded["config"], **_read_json(os.path.join(folder, "config.json"))}
    log = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(log):
        raise UsageError(f"{log}: no such file (the training history the curves are drawn from)")
    with open(log) as f:
        try:
            history = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as error:
            raise DataError(f"{log}: not a log of `aim train` ({error})") from None
    return Run(folder, path, loaded, config, history, model_from_checkpoint(loaded, device))


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not a JSON file ({error})") from None


def check_baseline(run, baseline):
    """The baseline must see the same images as the run: same classes, size and preprocessing."""
    for key in ("image_size", "preprocessing"):
        if run.config.get(key) != baseline.config.get(key):
            raise UsageError(f"--baseline {baseline.checkpoint_path}: {key} {baseline.config.get(key)!r} differs from "
                             f"{run.checkpoint_path}'s {run.config.get(key)!r}")
    if baseline.checkpoint["class_names"] != run.checkpoint["class_names"]:
        raise UsageError(f"--baseline {baseline.checkpoint_path}: classes {baseline.checkpoint['class_names'][:5]} differ "
                         f"from {run.checkpoint_path}'s {run.checkpoint['class_names'][:5]}")


# ---------------------------------------------------------------------------------------------
# What the page shows, as plain data (the template only lays it out).

def report_context(run, dataset, data_label, split, baseline=None, settings=None):
    """Everything the template needs. ``dataset``: the split (an :class:`aim.data.SampleDataset`
    with foregrounds), preprocessed as the run was trained; ``baseline``: a :class:`Run` drawn
    beside the run."""
    settings = settings or ReportSettings()
    if not dataset.has_foregrounds:
        raise UsageError(f"{data_label}: the report needs foreground segmentations (--segmentations DIR)")
    runs = [run] + ([baseline] if baseline is not None else [])
    results = [evaluate(r.model, dataset, batch_size=settings.batch_size, workers=settings.workers, device=settings.device,
                        group_weights=r.checkpoint.get("train_group_counts"), per_image=True) for r in runs]
    per_image = results[0]["per_image"]
    units = Units(dataset, results[0])
    shown = _Pictures(run, baseline, dataset, settings.device)
    return {
        "title": f"{run.label} report: {os.path.basename(os.path.normpath(run.folder))}",
        "run": _run_facts(run, baseline, data_label, split, len(dataset)),
        "models": [r.label for r in runs],
        "accuracy": _accuracy_table(units, results, runs, per_image),
        "curves": _curves_uri(run.history),
        "baseline_curves": _curves_uri(baseline.history) if baseline is not None else None,
        "decision": _decision_table(units, results),
        "leak": _leak_tables(units, results[0]),
        "pointing_game": _pointing_game_table(results),
        "faithfulness": _faithfulness(runs, dataset, per_image, settings),
        "background": _background_images(per_image, settings.background_images, shown, units),
        "galleries": _galleries(units, per_image, settings.gallery_per_group, shown),
        "stages": list(results[0].get("mask_active_fraction", {})),
        "settings": dataclasses.asdict(settings),
    }


class Units:
    """What accuracy is reported per: the groups (class x background), or the classes of a
    layout without groups; which of them are worst and which are conflicting."""

    def __init__(self, dataset, result):
        self.by_group = dataset.has_groups
        self.class_names = list(dataset.class_names)
        self.names = list(dataset.group_names) if self.by_group else self.class_names
        self.kind = "group" if self.by_group else "class"
        self.num_classes = dataset.num_classes
        self.accuracy = self.accuracy_of(result)

    def of(self, per_image):
        return per_image["groups" if self.by_group else "labels"]

    def conflicting(self, unit):
        """A group whose background is not its class's own (WaterBirds' group = 2 * y + place,
        with as many places as classes): where a shortcut through the background fails."""
        k = self.num_classes
        return self.by_group and len(self.names) == k * k and unit // k != unit % k

    def order(self, accuracy=None):
        """Worst first by ``accuracy`` (default: the run's), conflicting before agreeing on ties,
        empty last."""
        accuracy = self.accuracy if accuracy is None else accuracy
        return sorted(range(len(self.names)), key=lambda u: (accuracy[u] is None, accuracy[u] or 0, not self.conflicting(u), u))

    def accuracy_of(self, result):
        return result["group_accuracy"] if self.by_group else result["class_accuracy"]

    def worst(self, result):
        """The worst unit of ``result``: the first of its order (None when all are empty)."""
        accuracy = self.accuracy_of(result)
        first = self.order(accuracy)[0]
        return None if accuracy[first] is None else first


def _run_facts(run, baseline, data_label, split, count):
    config = run.config
    facts = [("model", run.label + (f"[{config['depth']}, {config['target']}]" if config["model"] == "aim" else "")),
             ("backbone", config["backbone"]), ("checkpoint", f"{run.checkpoint_path} (epoch {run.checkpoint['epoch']} of "
                                                             f"{len(run.history)})"),
             ("data", f"{data_label}, {split} split, {count} images"),
             ("package", f"aim-kernels {config.get('version') or 'unknown version'}, commit {config.get('git_commit') or 'unknown'}, "
                         f"torch {config.get('torch') or 'unknown'}")]
    if baseline is not None:
        facts.append(("baseline", f"{baseline.checkpoint_path} ({baseline.config['backbone']}, epoch {baseline.checkpoint['epoch']})"))
    settings = [(key, json.dumps(value)) for key, value in sorted(config.items()) if key not in ("version", "git_commit", "torch")]
    return {"facts": facts, "config": settings}


def _accuracy_table(units, results, runs, per_image):
    worst = [units.worst(r) for r in results]
    train_counts = runs[0].checkpoint.get("train_group_counts") if units.by_group else None
    counts = torch.bincount(torch.tensor([int(u) for u in units.of(per_image)]), minlength=len(units.names)).tolist()
    rows = []
    for u in units.order():
        rows.append({"name": units.names[u], "conflicting": units.conflicting(u),
                     "train_images": train_counts[u] if train_counts else None, "images": counts[u],
                     "cells": [format_number(units.accuracy_of(r)[u]) for r in results], "worst": [w == u for w in worst]})
    summary = [("accuracy (all images)", [r["accuracy"] for r in results])]
    if units.by_group:
        summary += [("mean-group accuracy", [r["mean_group_accuracy"] for r in results]),
                    ("weighted accuracy (training proportions)", [r["weighted_accuracy"] for r in results]),
                    ("worst-group accuracy", [r["worst_group_accuracy"] for r in results])]
    return {"kind": units.kind, "rows": rows, "summary": [(name, [format_number(v) for v in values]) for name, values in summary]}


def _decision_table(units, results):
    """The audit's mean shares of the margin on the object, the background and the bias."""
    audits = [r.get("decision_audit") for r in results]
    if audits[0] is None:
        return None
    key = "by_group" if units.by_group else "by_class"
    rows = [{"name": units.names[u], "conflicting": units.conflicting(u),
             "cells": [[format_number(a[key][share][u]) for share in ("object", "background", "bias")] for a in audits]}
            for u in units.order()]
    overall = [[format_number(a[share]) for share in ("object", "background", "bias")] for a in audits]
    return {"rows": rows, "overall": overall}


def _leak_tables(units, result):
    """Per mask stage: empty share, area AUCs, mean active fraction per group (or class)."""
    tables = []
    for stage, leak in result.get("mask_area_leak", {}).items():
        by_group = leak["active_by_group"] is not None
        by, names = (leak["active_by_group"], units.names) if by_group else (leak["active_by_class"], units.class_names)
        tables.append({"stage": stage, "empty_share": format_number(leak["empty_share"]),
                       "auc_class": format_number(leak["auc_class"]), "auc_background": format_number(leak["auc_background"]),
                       "active_fraction": format_number(result["mask_active_fraction"][stage]),
                       "active_by": list(zip(names, [format_number(v) for v in by]))})
    return tables


def _pointing_game_table(results):
    keys = list(results[0].get("energy_pointing_game", {}))
    rows = []
    for key in keys:
        label = "GradCAM" if key == "gradcam" else f"mask, stage {key}"
        rows.append((label, [format_number(r.get("energy_pointing_game", {}).get(key)) for r in results]))
    return rows


# ---------------------------------------------------------------------------------------------
# Explanation quality.

def _faithfulness(runs, dataset, per_image, settings):
    """Deletion / insertion AUCs and the grid pointing game of every run's decision map and
    GradCAM, on the first ``faithfulness_per_group`` images of every group."""
    chosen = _first_per_unit(per_image["groups"], settings.faithfulness_per_group)
    images = torch.stack([dataset[i][0] for i in chosen]).to(settings.device)
    labels = torch.tensor([int(per_image["labels"][i]) for i in chosen])
    layout = faithfulness.grid_layout(dataset.num_classes)
    rows, curves = [], []
    for run in runs:
        probabilities = _batched(lambda x: logits_of(run.model(x)).float().softmax(1).cpu(), images, settings.batch_size)
        predicted = probabilities.argmax(1)
        candidates = faithfulness.grid_candidates(probabilities, labels)
        grids, grid_targets = faithfulness.make_grids(images, labels, candidates, dataset.num_classes, settings.grids)
        for name, attribute in faithfulness.ATTRIBUTIONS.items():
            games = []
            for start in range(0, len(images), settings.batch_size):
                batch, targets = images[start:start + settings.batch_size], predicted[start:start + settings.batch_size]
                saliency = attribute(run.model, batch, targets.to(settings.device))
                games.append(faithfulness.deletion_insertion(run.model, batch, saliency, targets, steps=settings.steps))
            deletion = torch.cat([g["deletion"] for g in games])
            insertion = torch.cat([g["insertion"] for g in games])
            grid_scores = (faithfulness.grid_pointing_game(run.model, grids, grid_targets, attribute, layout, settings.batch_size)
                           if grids is not None else None)
            rows.append({"model": run.label, "map": name,
                         "grid": format_number(grid_scores.mean().item() if grid_scores is not None else None),
                         "grids": 0 if grids is None else len(grids),
                         "deletion": format_number(torch.cat([g["deletion_auc"] for g in games]).mean().item()),
                         "insertion": format_number(torch.cat([g["insertion_auc"] for g in games]).mean().item())})
            curves.append((f"{run.label} {name}", games[0]["fractions"], deletion.mean(0), insertion.mean(0)))
    return {"rows": rows, "images": len(chosen), "layout": f"{layout[0]} x {layout[1]}", "chance": format_number(1 / (layout[0] * layout[1])),
            "plot": _faithfulness_plot_uri(curves)}


def _first_per_unit(units, count):
    """Indices of the first ``count`` images of every group (dataset order), group by group."""
    units = [int(u) for u in units]
    chosen = []
    for u in sorted(set(units)):
        chosen += [i for i, v in enumerate(units) if v == u][:count]
    return chosen


def _batched(function, images, batch_size):
    with torch.no_grad():
        return torch.cat([function(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])


# ---------------------------------------------------------------------------------------------
# Pictures.

class _Pictures:
    """The panels of one image: the image with its object outlined, each stage's mask, the
    decision map of the run, and the baseline's GradCAM when there is a baseline."""

    def __init__(self, run, baseline, dataset, device):
        from aim.data.transforms import denormalize

        self.run, self.baseline, self.dataset, self.device = run, baseline, dataset, device
        raw = run.config.get("preprocessing", "imagenet") == "raw"
        self.to_display = (lambda image: image) if raw else (lambda image: denormalize(image.unsqueeze(0))[0])

    def panels(self, index):
        from aim.app.explain import explain_image

        image, label, _, foreground = self.dataset[index][:4]
        picture = self.to_display(image).permute(1, 2, 0).clamp(0, 1).cpu()
        edge = _outline(foreground.reshape(foreground.shape[-2:]))
        explained = explain_image(self.run.model, image.to(self.device), self.dataset.class_names)
        panels = [{"label": "image", "uri": _png_uri(_with_outline(picture, edge)), "empty": False}]
        for stage, mask in explained["masks"].items():
            keep = mask.cpu()
            shown = picture * (0.15 + 0.85 * keep[..., None])  # dropped positions dimmed
            panels.append({"label": f"mask {stage}: {keep.mean().item():.0%} active", "uri": _png_uri(_with_outline(shown, edge)),
                           "empty": not bool(keep.any())})
        if explained["decision"] is not None:
            panels.append({"label": f"decision vs {explained['runner_up']}", "empty": False,
                           "uri": _png_uri(_with_outline(_signed_heat(picture, explained["decision"].cpu()), edge))})
        if self.baseline is not None:
            other = explain_image(self.baseline.model, image.to(self.device), self.dataset.class_names)
            panels.append({"label": f"baseline GradCAM, pred {other['class']}", "empty": False,
                           "uri": _png_uri(_with_outline(_heat(picture, other["gradcam"].cpu()), edge))})
        return {"label": self.dataset.class_names[int(label)], "predicted": explained["class"],
                "probability": f"{explained['probability']:.2f}", "correct": explained["class"] == self.dataset.class_names[int(label)],
                "panels": panels}


def _background_images(per_image, count, pictures, units):
    """The images whose decision rests most on the background (largest background share)."""
    if "decision/background" not in per_image:
        return []
    shares = torch.tensor(per_image["decision/background"])
    shown = []
    for index in torch.argsort(shares, descending=True, stable=True)[:count].tolist():
        entry = pictures.panels(index)
        entry.update(index=index, unit=units.names[int(units.of(per_image)[index])],
                     shares=[format_number(per_image[f"decision/{s}"][index]) for s in ("object", "background", "bias")])
        shown.append(entry)
    return shown


def _galleries(units, per_image, count, pictures):
    """Per group, worst first: wrong predictions first, then by the share of the decision on the
    background (most first)."""
    galleries = []
    unit_of = [int(u) for u in units.of(per_image)]
    background = per_image.get("decision/background", [0.0] * len(unit_of))
    for u in units.order():
        members = [i for i, v in enumerate(unit_of) if v == u]
        members.sort(key=lambda i: (per_image["predicted"][i] == per_image["labels"][i], -background[i], i))
        entries = []
        for index in members[:count]:
            entry = pictures.panels(index)
            entry.update(index=index, shares=[format_number(per_image[f"decision/{s}"][index]) for s in ("object", "background", "bias")]
                         if "decision/object" in per_image else None)
            entries.append(entry)
        galleries.append({"name": units.names[u], "accuracy": format_number(units.accuracy[u]),
                          "conflicting": units.conflicting(u), "images": entries, "total": len(members)})
    return galleries


def _outline(foreground):
    """(H, W) bool: the object's boundary pixels (foreground minus its 3x3 erosion)."""
    inside = foreground.float()[None, None] > 0
    eroded = -F.max_pool2d(-inside.float(), 3, stride=1, padding=1) > 0
    return (inside & ~eroded)[0, 0].cpu()


def _with_outline(picture, edge):
    shown = picture.clone()
    shown[edge] = torch.tensor([1.0, 0.0, 0.0])
    return shown


def _heat(picture, values):
    """GradCAM (in [0, 1]) over the image, jet at 45%."""
    from matplotlib import colormaps

    colour = torch.from_numpy(colormaps["jet"](values.clamp(0, 1).numpy())[..., :3]).float()
    return 0.55 * picture + 0.45 * colour


def _signed_heat(picture, values):
    """A signed map over the grey image: red for the predicted class, blue against, white 0."""
    from matplotlib import colormaps

    limit = max(values.abs().max().item(), 1e-12)
    colour = torch.from_numpy(colormaps["RdBu_r"](((values / limit + 1) / 2).numpy())[..., :3]).float()
    grey = picture.mean(2, keepdim=True).expand_as(picture)
    return 0.3 * grey + 0.7 * colour


def _png_uri(picture):
    """(H, W, 3) float in [0, 1] -> data:image/png URI, enlarged by whole pixels to ~PANEL_PIXELS."""
    from PIL import Image

    height, width = picture.shape[:2]
    scale = max(1, PANEL_PIXELS // max(height, width))
    array = (picture.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array).resize((width * scale, height * scale), Image.NEAREST)
    return _uri(image.save, "png")


def _uri(save, kind):
    buffer = io.BytesIO()
    save(buffer, format=kind)
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves_uri(history):
    from aim.app.visualize import save_curves

    buffer = io.BytesIO()
    save_curves(history, buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _faithfulness_plot_uri(curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, fractions, deletion, insertion in curves:
        axes[0].plot(fractions.numpy(), deletion.numpy(), label=label)
        axes[1].plot(fractions.numpy(), insertion.numpy(), label=label)
    for ax, title in zip(axes, ("deletion (lower is better)", "insertion (higher is better)")):
        ax.set_title(title)
        ax.set_xlabel("fraction of pixels, most salient first")
        ax.set_ylabel("probability of the explained class")
        ax.set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    uri = _uri(lambda buffer, format: fig.savefig(buffer, format=format, dpi=90), "png")
    plt.close(fig)
    return uri


# ---------------------------------------------------------------------------------------------
# The page.

def render(context):
    """The HTML of the page (aim/app/templates/report.html.j2, shipped as package data)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("aim.app", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template("report.html.j2").render(**context)


def write_report(path, run, dataset, data_label, split, baseline=None, settings=None):
    """Build, render and write the report to ``path`` (one rename: never half a file)."""
    from aim.checkpoint import atomic_write

    html = render(report_context(run, dataset, data_label, split, baseline, settings))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: no such folder {folder}")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(html)
    atomic_write(path, write)
    return path


def command_report(args):
    """``aim report``: every input read and checked, then the page built and written."""
    settings = ReportSettings(gallery_per_group=args.gallery, background_images=args.background_images,
                              faithfulness_per_group=args.faithfulness_images, steps=args.steps, grids=args.grids,
                              batch_size=args.batch_size, workers=args.workers, device=args.device)
    for name in ("gallery", "faithfulness_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from aim.config import check_device

    check_device(args.device)
    run = load_run(args.run, args.checkpoint, args.device)
    baseline = load_run(args.baseline, args.checkpoint, args.device) if args.baseline else None
    if baseline is not None:
        check_baseline(run, baseline)
    data = args.data or run.config.get("data")
    if not data:
        raise UsageError(f"--data DIR is needed: {os.path.join(args.run, 'config.json')} records no dataset folder")
    segmentations = args.segmentations or os.path.join(data, "segmentations")
    dataset = open_split_for(run.checkpoint, run.checkpoint_path, data, args.split, segmentations, args.workers)
    threads = torch.get_num_threads()
    try:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        write_report(args.out, run, dataset, data, args.split, baseline, settings)
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {args.out}")
