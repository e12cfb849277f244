"""Checkpoint files and the models they hold: the model a config describes, reading a
checkpoint back (:func:`load_checkpoint`, the public loader), and the atomic writes of a run
folder. Training writes what this module reads; evaluation, explanation and the report read it."""
import json
import os
import re
from typing import NamedTuple

import torch

from aim.config import SMALL_BACKBONE, TrainConfig, saved_config
from aim.errors import UsageError, first_line
from aim.nn.model import AIM
from aim.nn.backbones import BaselineClassifier, SmallConvNet, build_backbone, load_backbone_weights
from aim.nn.timm_backbones import is_timm_name

CHECKPOINT_FORMAT = "aim-train-checkpoint-1"


def build_model(config, num_classes):
    """The model a config describes, randomly initialized or with its --weights loaded into the
    backbone and its --pathway-weights into the top-down pathway. A failed download of DEFAULT
    weights, or a weights file that does not fit, is a ValueError with a message for the user."""
    backbone = build_run_backbone(config)
    if config.model == "baseline":
        return BaselineClassifier(backbone, num_classes)
    model = AIM(backbone, num_classes=num_classes, depth=config.depth, target=config.target,
               out_channels=config.topdown_channels, mask_hidden_channels=config.mask_channels,
               temperature=config.temperature, use_reference=config.use_reference,
               initial_mask_logit=config.initial_mask_logit, mask_topdown_context=config.mask_topdown_context,
               pooling=config.pooling, mask_saliency_prior=config.mask_saliency_prior,
               mask_budget=config.mask_budget, mask_blocks=config.mask_blocks, mask_image=config.mask_image,
               mask_estimator=config.mask_estimator)
    if config.pathway_weights != "none":
        load_pathway_weights(model, config.pathway_weights, config.pathway_layers)
    return model


def load_pathway_weights(model, path, layers="all"):
    """Start ``model``'s top-down pathway (``layers`` "all") or its lateral convolutions only
    ("lateral") from those of the AIM checkpoint at ``path``: every parameter and BatchNorm
    statistic of them, which must all be there with the same shapes (the same depth, widths and
    options), else a UsageError naming the file. The mask budget's ``active_fraction`` stays the
    run's own (its schedule sets it)."""
    given_as = f"--pathway-weights {path}"
    state = read_checkpoint(path, given_as)["model"]
    prefix = "" if layers == "all" else "lateral."
    own = {k: v for k, v in model.topdown.state_dict().items() if k != "active_fraction" and k.startswith(prefix)}
    found = {k.removeprefix("topdown."): v for k, v in state.items()
             if k.startswith("topdown." + prefix) and k != "topdown.active_fraction"}
    if not found:
        raise UsageError(f"{given_as}: holds no top-down pathway (a baseline's checkpoint?); pass an AIM run's best.pt")
    missing, unexpected = sorted(own.keys() - found.keys()), sorted(found.keys() - own.keys())
    mismatched = sorted(k for k in own.keys() & found.keys() if own[k].shape != found[k].shape)
    if missing or unexpected or mismatched:
        raise UsageError(f"{given_as}: its pathway does not fit this run's (another depth, width or mask option?): "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                         f"{len(mismatched)} of another shape (e.g. {mismatched[:2]})")
    model.topdown.load_state_dict(found, strict=False)  # every key of ``layers`` checked above


def build_run_backbone(config):
    """The backbone with --weights loaded (``aim train`` calls it first of all, so bad weights
    stop the run before the data is read)."""
    if config.backbone == SMALL_BACKBONE:
        if config.weights == "DEFAULT":
            raise UsageError(f"--weights DEFAULT: torchvision has no pretrained {SMALL_BACKBONE}; use --weights none or PATH")
        backbone = SmallConvNet()
    else:
        backbone = _named_backbone(config)
    if config.weights not in ("none", "DEFAULT"):
        load_backbone_weights(backbone, load_file(config.weights, f"--weights {config.weights}"),
                              f"--weights {config.weights}")
    return backbone


def _named_backbone(config):
    name, weights = config.backbone, None if config.weights != "DEFAULT" else "DEFAULT"
    source, saved_by = (("timm", f"timm.create_model({name.removeprefix('timm:')!r}, pretrained=True)") if is_timm_name(name)
                        else ("torchvision", f"torchvision.models.get_model({name!r}, weights='DEFAULT')"))
    try:
        return build_backbone(name, weights=weights, stages_used=config.depth if config.model == "aim" else 1,
                              image_size=config.image_size, **(config.timm_kwargs or {}))
    except TypeError as error:  # create_model's arguments
        raise UsageError(f"--timm-kwargs {json.dumps(config.timm_kwargs)}: {error}") from None
    except (OSError, RuntimeError) as error:  # URLError and the hub's LocalEntryNotFoundError are OSErrors
        if weights is None:
            raise
        raise UsageError(f"--weights DEFAULT: could not download {source}'s pretrained {name} weights "
                         f"({first_line(error)}); offline, download them on a "
                         f"machine with network ({saved_by}.state_dict(), torch.save) and pass --weights PATH, or train from "
                         f"scratch with --weights none") from None


def load_file(path, given_as):
    """torch.load of a file the user named; ``given_as`` is how (e.g. "--weights w.pt"), for errors."""
    if not os.path.isfile(path):
        raise UsageError(f"{given_as}: no such file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{given_as}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors of many kinds: the file is not a state dict
        raise UsageError(f"{given_as}: cannot be read by torch.load ({first_line(error)}); "
                         f"is it truncated or not a PyTorch file?") from None


def read_checkpoint(path, given_as=None):
    """A checkpoint written by ``aim train`` (last.pt or best.pt), as a dict. ``given_as``: how
    the user named the file (e.g. "checkpoint run/best.pt"), for errors; default the path."""
    given_as = given_as or path
    checkpoint = load_file(path, given_as)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{given_as}: not a checkpoint written by `aim train`")
    if non_finite_tensors(checkpoint["model"].values()):
        raise UsageError(f"{given_as}: the weights hold NaN or infinity (a run that diverged); train again with a lower --lr")
    return checkpoint


def non_finite_tensors(tensors):
    """How many of the floating-point ``tensors`` hold a NaN or an infinity, as a 0-d tensor on
    their device (summed there: one synchronization when read, not one per tensor)."""
    flags = [~torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return torch.stack(flags).sum() if flags else torch.zeros((), dtype=torch.long)


def model_from_checkpoint(checkpoint, device="cpu"):
    """The trained model of a checkpoint, in eval mode."""
    config = TrainConfig(**{**saved_config(checkpoint), "weights": "none", "pathway_weights": "none"})
    model = build_model(config, len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.to(device).eval()


def atomic_write(path, write):
    """write(tmp_path) then os.replace: a reader (or a resumed run) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


# The files of a run folder that atomic_write writes, and its temporary names for them.
ATOMIC_RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt")


STALE_TEMPORARY = re.compile(rf"(?:{'|'.join(map(re.escape, ATOMIC_RUN_FILES))})\.tmp\d+")


def remove_stale_temporaries(folder):
    """Delete what atomic_write of a killed run left in ``folder`` (``last.pt.tmp1234``, ...);
    nothing else, whatever its name."""
    for entry in os.scandir(folder):
        if entry.is_file() and STALE_TEMPORARY.fullmatch(entry.name):
            os.remove(entry.path)


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


class CheckpointInfo(NamedTuple):
    """What a checkpoint records beside the weights."""

    path: str
    config: TrainConfig         # the settings it was trained with
    epoch: int                  # epochs trained when it was written
    class_names: list
    group_names: list           # None for a class-per-folder dataset
    val: dict                   # validation metrics of that epoch (aim.app.evaluate.evaluate's)
    train_group_counts: list    # images per training group: the weights of "weighted accuracy"


def load_checkpoint(path, device="cpu"):
    """The eval-ready model (AIM or the baseline) of a checkpoint that ``aim train`` or ``aim
    demo`` wrote, on ``device``, and its :class:`CheckpointInfo`. ``path``: a checkpoint file
    (best.pt, last.pt) or a run folder (its best.pt). A missing file or a file of another kind
    is an ``aim.errors.UsageError`` (a ValueError) naming it.

        model, info = aim.load_checkpoint("run")
        print(info.class_names, info.epoch, info.config.backbone)
    """
    if os.path.isdir(path):
        path = os.path.join(path, "best.pt")
    checkpoint = read_checkpoint(path)
    info = CheckpointInfo(path=path, config=TrainConfig(**saved_config(checkpoint)), epoch=checkpoint["epoch"],
                          class_names=checkpoint["class_names"], group_names=checkpoint.get("group_names"),
                          val=checkpoint.get("val"), train_group_counts=checkpoint.get("train_group_counts"))
    return model_from_checkpoint(checkpoint, device), info
