"""The spurious-correlation protocol on the embedded benchmark (``aim demo`` and
``benchmarks/study_spurious.py``), every step through ``aim.app.train.fit`` and ``aim.app.evaluate``:

1. pretrain a SmallConvNet backbone on the unbiased set (:func:`pretrained_backbone`), then AIM's
   top-down pathway on the same images from that backbone (:func:`pretrained_pathway`), both cached
   on disk under ``$XDG_CACHE_HOME/aim-kernels`` or ``~/.cache/aim-kernels``;
2. fine-tune the baseline and AIM from the backbone (AIM's pathway from its pretrained one) on the
   biased task (:func:`finetune`), best.pt selected on val worst-group accuracy by the training loop;
3. evaluate best.pt on the balanced test split: accuracy (also weighted by the training groups'
   proportions), worst-group accuracy, the EPG of every mask stage and of GradCAM, the audit,
   and where the masks sit (:func:`mask_placement`); and on the unseen-scene test.

:func:`write_task` (``aim data embedded``) writes the same splits in the WaterBirds layout.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time

import torch
import torch.nn.functional as F

from aim.config import SMALL_BACKBONE, TrainConfig
from aim.app.train import fit
from aim.checkpoint import read_checkpoint, model_from_checkpoint

# The unbiased pretraining sets: generated shapes on textures (the embedded task's), photographs (the photo task's).
PRETRAINING_SETS = ("shapes", "photos")
# Bump when the generator or the pretraining recipe changes: cached backbones are then retrained.
PRETRAIN_VERSION = 2


@dataclasses.dataclass
class PretrainSettings:
    image_size: int = 64
    train_size: int = 8000
    val_size: int = 500
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    backbone: str = SMALL_BACKBONE  # or any aim train --backbone, e.g. timm:vit_tiny_patch16_224
    timm_kwargs: dict = None        # timm.create_model arguments of a timm:NAME backbone
    images: str = "shapes"          # or "photos": aim.data.photos.make_pretraining_split, for the photo task


@dataclasses.dataclass
class PathwaySettings:
    """AIM trained on the pretraining images from the pretrained backbone, for its top-down
    pathway: the recipe starts AIM's lateral convolutions from it (``pathway_layers``
    "lateral"), so from the first step AIM's classifiers read projections that were trained where
    the background tells nothing about the class; the backbone AIM fine-tunes is the baseline's,
    the mask estimators and classifiers start new (docs/embedded_benchmark.md, "A pretrained
    pathway"). epochs 0: no pathway pretraining (AIM's pathway starts new)."""
    epochs: int = 6
    lr: float = 1e-3


@dataclasses.dataclass
class TaskSettings:
    image_size: int = 64
    spurious_correlation: float = 0.95
    train_size: int = 2000
    val_size: int = 400    # balanced: a quarter per group
    test_size: int = 800   # balanced
    seed: int = 0          # data seed (each split derives its own)
    unseen_size: int = 800  # the unseen-scene test (TravelingBirds), balanced
    classes: dict = None   # {class: sub-shapes} (None: aim.data.embedded.FINETUNE_CLASSES)
    area_range: tuple = None  # object area / image area (None: aim.data.embedded.AREA_RANGE)


def cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "aim-kernels")


def pretrained_backbone(settings, threads=1, log=print, cache=None):
    """Path of a checkpoint of SmallConvNet pretrained on the unbiased set (a baseline model over
    the ``PRETRAIN_SHAPES`` classes), training it first unless the cache has it. Returns (path,
    whether it was trained now, the pretraining val accuracy)."""
    recorded = _recorded_pretrain(settings)
    if settings.backbone == SMALL_BACKBONE and settings.timm_kwargs is None:  # the key of caches made before these fields existed
        del recorded["backbone"], recorded["timm_kwargs"]
    key = hashlib.sha256(json.dumps({"version": PRETRAIN_VERSION, **recorded}, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache if cache is not None else cache_dir(), "pretrained")
    path = os.path.join(folder, f"{settings.backbone.replace(':', '_')}_{key}.pt")
    if os.path.isfile(path):
        checkpoint = read_checkpoint(path)
        return path, False, checkpoint["val"]["accuracy"]
    train, val = pretraining_splits(settings)
    config = TrainConfig(out="", model="baseline", backbone=settings.backbone, timm_kwargs=settings.timm_kwargs, epochs=settings.epochs,
                         anneal_epochs=0, batch_size=settings.batch_size, lr=settings.lr,
                         image_size=settings.image_size, preprocessing="raw", workers=0, seed=settings.seed, threads=threads)
    log(f"pretraining {settings.backbone} on {len(train)} unbiased images ({len(train.class_names)} {settings.images} on "
        f"{len(train.background_names)} backgrounds), {settings.epochs} epochs; cached as {path}")
    _train_into(path, config, train, val, log)
    return path, True, read_checkpoint(path)["val"]["accuracy"]


def _recorded_pretrain(settings):
    """The fields of a :class:`PretrainSettings` that key its caches; ``images`` only when not the
    shapes, so caches made before the field existed keep their key."""
    recorded = dataclasses.asdict(settings)
    if settings.images == "shapes":
        del recorded["images"]
    return recorded


def pretraining_splits(settings):
    """(train, val) of the unbiased pretraining set of ``settings`` (a :class:`PretrainSettings`)."""
    from aim.data import embedded, photos

    if settings.images not in PRETRAINING_SETS:
        raise ValueError(f"PretrainSettings.images must be one of {', '.join(PRETRAINING_SETS)}, got {settings.images!r}")
    make = {"shapes": embedded.make_pretraining_split, "photos": photos.make_pretraining_split}[settings.images]
    return (make(settings.train_size, settings.image_size, seed=settings.seed * 1000 + 1),
            make(settings.val_size, settings.image_size, seed=settings.seed * 1000 + 2))


def _train_into(path, config, train, val, log):
    """``fit`` in a scratch run folder beside ``path``, then its best.pt moved to ``path``."""
    run = f"{path}.run{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fit(dataclasses.replace(config, out=run), train.as_dataset(), val.as_dataset(), log=log)
    os.replace(os.path.join(run, "best.pt"), path)  # atomic: a second run finds it complete or not at all
    shutil.rmtree(run, ignore_errors=True)


def pretrained_pathway(pretrain, backbone_weights, settings, overrides=None, threads=1, log=print, cache=None):
    """Path of an AIM checkpoint trained per ``settings`` (a :class:`PathwaySettings`) on the
    pretraining images of ``pretrain`` from ``backbone_weights``, with the fine-tuning recipe's
    AIM settings (``FINETUNE_DEFAULTS`` and ``overrides``, so its pathway fits the model
    :func:`finetune` builds), training it first unless the cache has it; None when
    ``settings.epochs`` is 0. Returns (path, whether it was trained now, its val accuracy)."""
    if settings.epochs == 0:
        return None, False, None
    config = TrainConfig(out="", model="aim", weights=backbone_weights, image_size=pretrain.image_size, seed=0, threads=threads,
                         **{**FINETUNE_DEFAULTS, **(overrides or {}), "epochs": settings.epochs, "lr": settings.lr,
                            "backbone_lr": None, "pathway_weights": "none", "pathway_layers": "all", "workers": 0})
    recipe = {k: v for k, v in recorded_settings(config).items() if k not in ("threads", "use_reference", "weights", "pathway_layers")}
    recorded = {"version": PRETRAIN_VERSION, "backbone": os.path.basename(backbone_weights), "pretrain": _recorded_pretrain(pretrain),
                "recipe": recipe}
    key = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache if cache is not None else cache_dir(), "pretrained", f"aim_pathway_{key}.pt")
    if os.path.isfile(path):
        return path, False, read_checkpoint(path)["val"]["accuracy"]
    train, val = pretraining_splits(pretrain)
    log(f"pretraining AIM's top-down pathway on the same {len(train)} unbiased images from the pretrained backbone, "
        f"{settings.epochs} epochs; cached as {path}")
    _train_into(path, config, train, val, log)
    return path, True, read_checkpoint(path)["val"]["accuracy"]


def task_splits(settings):
    """(train, val, test, unseen-scene test) :class:`aim.data.embedded.EmbeddedSplit` of the biased task."""
    from aim.data.embedded import AREA_RANGE, FINETUNE_CLASSES, make_spurious_split, make_unseen_scene_split

    base = settings.seed * 1000
    objects = dict(classes=settings.classes or FINETUNE_CLASSES, area_range=settings.area_range or AREA_RANGE)
    train = make_spurious_split(settings.train_size, settings.image_size, settings.spurious_correlation, seed=base + 11, **objects)
    val = make_spurious_split(settings.val_size, settings.image_size, seed=base + 12, balanced=True, **objects)
    test = make_spurious_split(settings.test_size, settings.image_size, seed=base + 13, balanced=True, **objects)
    unseen = make_unseen_scene_split(settings.unseen_size, settings.image_size, seed=base + 14, **objects)
    return train, val, test, unseen


def write_task(root, settings):
    """Write the task of ``settings`` (the splits :func:`task_splits` makes, so the same data the demo
    and the study train and test on) in the WaterBirds layout: root/metadata.csv (with class_name
    and place_name columns), root/images/<class>/<split>_<i>.png, root/segmentations/ (each
    object's exact mask), and the unseen-scene test as its own WaterBirds folder
    root/unseen_scenes/ (test split only). Images are PNG at their 8 bits: they read back equal."""
    from aim.data.toy import save_waterbirds_layout

    train, val, test, unseen = task_splits(settings)
    layouts = ((root, {"train": train, "val": val, "test": test}), (os.path.join(root, "unseen_scenes"), {"test": unseen}))
    for folder, splits in layouts:
        first = next(iter(splits.values()))  # every split of a folder has the same class and place names
        save_waterbirds_layout(folder, splits, "png", class_names=first.class_names, place_names=first.background_names,
                               foregrounds={split: data.foregrounds[:, 0] for split, data in splits.items()})
    return {"train": train, "val": val, "test": test, "unseen_scenes/test": unseen}


def command_data(args):
    """``aim data embedded``: :func:`write_task` into --out (replaced if it holds a metadata.csv)."""
    from aim.errors import UsageError

    if os.path.isfile(os.path.join(args.out, "metadata.csv")):
        shutil.rmtree(args.out)
    elif os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"--out {args.out}: not empty and holds no metadata.csv; not replacing it")
    settings = TaskSettings(image_size=args.image_size, spurious_correlation=args.spurious_correlation,
                            train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                            unseen_size=args.unseen_size, seed=args.seed)
    try:
        splits = write_task(args.out, settings)
    except ValueError as error:  # the generator's argument checks
        raise UsageError(str(error)) from None
    print(f"wrote the embedded task (seed {args.seed}, background = class in {args.spurious_correlation:.0%} of training "
          f"images) to {args.out} in the WaterBirds layout, {args.image_size}x{args.image_size} PNG")
    for name, split in splits.items():
        counts = torch.bincount(split.groups, minlength=4).tolist()
        groups = ", ".join(f"{c}/{b} {counts[2 * i + j]}" for i, c in enumerate(split.class_names)
                           for j, b in enumerate(split.background_names))
        print(f"  {name}: {groups}")
    print(f"train on it with: aim train --data {args.out} --preprocessing raw --image-size {args.image_size} "
          f"--segmentations {os.path.join(args.out, 'segmentations')} ...")


# The fine-tuning recipe for both models: the whole network fine-tuned, as the paper and WaterBirds'
# baselines do (backbone_lr None: the backbone at lr too), the generated tensors used as they are
# (preprocessing "raw", recorded so `aim eval` reads the files of `aim data embedded` the same way).
# AIM's settings (the baseline ignores them) are the ones the study found it needs to rest on the
# object (docs/embedded_benchmark.md, "What it takes"): a budget the size of the objects (target
# 0.1 against objects of 6-14% of the image) kept exactly by every image in training too
# ("fixed"), at that budget from the first epoch (no annealing: an epoch at tau 1 teaches the
# classifier the background first), the mask logits led by the stage maps' energy (the saliency
# prior, object-salient after pretraining), and the lateral convolutions from AIM's pathway
# pretrained on the unbiased images (pathway_layers "lateral"; the path is :func:`pretrained_pathway`'s).
FINETUNE_DEFAULTS = dict(backbone=SMALL_BACKBONE, depth=2, target=0.1, topdown_channels=64, mask_channels=32,
                         temperature=1.0, epochs=12, anneal_epochs=0, batch_size=64, lr=5e-4, backbone_lr=None,
                         weight_decay=1e-4, workers=0, preprocessing="raw", mask_budget="fixed",
                         mask_saliency_prior=True, pathway_layers="lateral")


def recorded_settings(config):
    """Every setting of a run's recipe (the TrainConfig fields but where it writes and reads)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "data", "segmentations")}


def finetune(kind, weights, train, val, test, out, seed=0, threads=1, overrides=None, log=print, unseen=None,
             pathway_weights=None):
    """Train ``kind`` ("aim" or "baseline") from ``weights`` (AIM's pathway from
    ``pathway_weights``, if given) in ``out`` (replaced), then evaluate its best.pt
    (val-selected) on ``test`` (and on ``unseen``, the unseen-scene split, if given).
    Returns a JSON-ready record."""
    settings = {**FINETUNE_DEFAULTS, **(overrides or {})}
    if kind == "aim" and pathway_weights is not None:
        settings["pathway_weights"] = pathway_weights
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(out=out, model=kind, weights=weights, image_size=train.images.shape[-1], seed=seed,
                         threads=threads, **settings)
    started = time.perf_counter()
    _, history = fit(config, train.as_dataset(), val.as_dataset(), log=log)
    checkpoint = read_checkpoint(os.path.join(out, "best.pt"))
    model = model_from_checkpoint(checkpoint)
    result = evaluate_test(model, test, group_weights=checkpoint["train_group_counts"])
    if unseen is not None:
        result["unseen_scenes"] = evaluate_test(model, unseen)
    return {"kind": kind, "settings": recorded_settings(config), "seed": seed, "best_epoch": checkpoint["epoch"],
            "val": checkpoint["val"], "test": result, "time_s": time.perf_counter() - started,
            "val_curve": [{"epoch": row["epoch"], "worst_group": row["val"]["worst_group_accuracy"],
                           "accuracy": row["val"]["accuracy"], "tau": row["tau"],
                           "mask_active_fraction": row["mask_active_fraction"],
                           "epg": row["val"].get("energy_pointing_game")} for row in history]}


def evaluate_test(model, split, batch_size=100, group_weights=None):
    """aim.app.evaluate metrics on ``split`` (GradCAM included) plus, for AIM, :func:`mask_placement`."""
    from aim.app.evaluate import evaluate

    result = evaluate(model, split.as_dataset(), batch_size=batch_size, group_weights=group_weights)
    if hasattr(model, "topdown"):
        result["mask_placement"] = mask_placement(model, split, batch_size)
    return result


@torch.no_grad()
def mask_placement(model, split, batch_size=100):
    """Per mask stage, the fraction of object pixels and of background pixels the eval-mode
    mask keeps (nearest-upsampled to the image), over the images whose background agrees with
    the class and those where it conflicts: a mask that sits on the object keeps much more of
    the object than of the background."""
    model.eval()
    sums = {}
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size]
        foreground = split.foregrounds[start:start + batch_size, 0].bool()
        conflict = split.labels[start:start + batch_size] != split.backgrounds[start:start + batch_size]
        for name, mask in model(images).masks.items():
            keep = F.interpolate(mask.float(), size=images.shape[-2:], mode="nearest")[:, 0]
            for subset, members in (("agree", ~conflict), ("conflict", conflict)):
                if not members.any():
                    continue
                fg, k = foreground[members], keep[members]
                entry = sums.setdefault(name, {}).setdefault(subset, [0.0, 0.0, 0.0, 0.0])
                entry[0] += (k * fg).sum().item()
                entry[1] += fg.sum().item()
                entry[2] += (k * ~fg).sum().item()
                entry[3] += (~fg).sum().item()
    return {name: {subset: {"object_kept": v[0] / v[1], "background_kept": v[2] / v[3]} for subset, v in by.items()}
            for name, by in sums.items()}


def summary_row(record):
    """The numbers of one fine-tuned model for the side-by-side table."""
    test = record["test"]
    epg = test.get("energy_pointing_game", {})
    masks = {k: v for k, v in epg.items() if k != "gradcam"}
    leak = test.get("mask_area_leak", {})
    decision = test.get("decision_audit") or {}
    unseen = test.get("unseen_scenes")
    return {"accuracy": test["accuracy"], "weighted_accuracy": test.get("weighted_accuracy"),
            "worst_group": test["worst_group_accuracy"], "epg_gradcam": epg.get("gradcam"),
            "unseen_accuracy": unseen["accuracy"] if unseen else None,
            "unseen_worst_group": unseen["worst_group_accuracy"] if unseen else None,
            "epg_masks": masks, "best_epoch": record["best_epoch"], "val_worst_group": record["val"]["worst_group_accuracy"],
            "decision_object": decision.get("object"), "decision_background": decision.get("background"),
            "decision_bias": decision.get("bias"),
            "mask_leak": {stage: {k: v[k] for k in ("empty_share", "auc_class", "auc_background")} for stage, v in leak.items()}}
