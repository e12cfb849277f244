"""Evaluation of a trained classifier (AIM or the baseline) on one split: accuracy, per-group
(or per-class) accuracy, worst-group and mean-group accuracy, the masks' active fractions, and
the Energy Pointing Game of each stage's mask and of GradCAM (Captum ``LayerGradCam`` on the
backbone's last stage, for both model kinds).

Every number is built from sums, so ranks of a multi-process run evaluate disjoint shards and
:func:`evaluate` reduces the sums before dividing.
"""
import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from aim import metrics
from aim.errors import UsageError
from aim.model import AIMOutput


def logits_of(output):
    return output.logits if isinstance(output, AIMOutput) else output


def gradcam(model, images, targets):
    """GradCAM of ``targets`` (N,) on the last stage of ``model.backbone``, (N, 1, h, w), ReLU
    applied (captum.attr.LayerGradCam)."""
    from captum.attr import LayerGradCam

    cam = LayerGradCam(lambda x: logits_of(model(x)), model.backbone.last_stage)
    with torch.enable_grad():
        return cam.attribute(images, target=targets, relu_attributions=True).detach()


class _Sums:
    """Per-group correct/seen counts, per-stage mask fractions and EPG sums of one shard."""

    def __init__(self, num_groups, num_classes):
        self.values = {"group_correct": torch.zeros(num_groups, dtype=torch.float64),
                       "group_seen": torch.zeros(num_groups, dtype=torch.float64),
                       "class_correct": torch.zeros(num_classes, dtype=torch.float64),
                       "class_seen": torch.zeros(num_classes, dtype=torch.float64)}

    def add(self, name, value):
        self.values[name] = self.values.get(name, 0.0) + float(value)

    def reduce(self, device):
        """Sum over the ranks of the process group."""
        names = sorted(self.values)
        flat = torch.cat([torch.as_tensor(self.values[n], dtype=torch.float64).flatten() for n in names]).to(device)
        dist.all_reduce(flat)
        flat, offset = flat.cpu(), 0
        for n in names:
            size = torch.as_tensor(self.values[n]).numel()
            chunk = flat[offset:offset + size]
            self.values[n] = chunk if torch.is_tensor(self.values[n]) and self.values[n].dim() else chunk.item()
            offset += size


@torch.no_grad()
def evaluate(model, dataset, batch_size=64, workers=0, device="cpu", amp_dtype=None, channels_last=False,
             with_gradcam=True, rank=0, world_size=1):
    """Metrics of ``model`` on ``dataset`` (an :class:`aim.data.SampleDataset`) as a JSON-ready dict.

    Keys: num_samples, accuracy, class_accuracy, group_accuracy / worst_group_accuracy /
    mean_group_accuracy (None for layouts without groups), mask_active_fraction {stage} (AIM),
    energy_pointing_game {stage..., "gradcam"} and foreground_images (datasets with
    foregrounds; GradCAM only with ``with_gradcam``). GradCAM targets the true class.
    In multi-process runs every rank passes its rank and world size, evaluates its shard, and
    gets the result of the whole split; world_size 1 evaluates the whole split in this process.
    """
    from aim.data import ShardSampler

    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size), num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    sums = _Sums(dataset.num_groups, dataset.num_classes)
    try:
        for batch in loader:
            images, labels, groups = batch[0].to(device, non_blocking=True), batch[1], batch[2]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            correct = (logits_of(output).argmax(1).cpu() == labels).double()
            sums.values["group_correct"].index_add_(0, groups, correct)
            sums.values["group_seen"].index_add_(0, groups, torch.ones_like(correct))
            sums.values["class_correct"].index_add_(0, labels, correct)
            sums.values["class_seen"].index_add_(0, labels, torch.ones_like(correct))
            masks = output.masks if isinstance(output, AIMOutput) else {}
            for name, mask in masks.items():
                sums.add(f"active/{name}", metrics.mask_active_fraction(mask).sum())
            if not dataset.has_foregrounds:
                continue
            foreground = batch[3].to(device)
            has_foreground = (foreground.flatten(1) != 0).any(1)
            sums.add("foreground_images", has_foreground.sum())
            for name, mask in masks.items():
                sums.add(f"epg/{name}", metrics.energy_pointing_game(mask, foreground)[has_foreground].sum())
            if with_gradcam:
                cam = gradcam(unwrap(model), images, labels.to(device))
                sums.add("epg/gradcam", metrics.energy_pointing_game(cam, foreground, mode="bilinear")[has_foreground].sum())
    finally:
        model.train(was_training)
    # Every rank must reduce the same keys, also one whose shard was empty and saw no masks.
    return _finalize(sums, dataset, mask_stage_names(model), device, with_gradcam, world_size)


def unwrap(model):
    """The module itself under torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def mask_stage_names(model):
    """Names of an AIM model's mask stages, finest first ([] for the baseline). Backbones built
    here return lists of stages, which the model names "0", "1", ... by position."""
    model = unwrap(model)
    if not hasattr(model, "topdown"):
        return []
    count = len(model.topdown.in_channels_list)
    return [str(i) for i in range(count - model.depth, count)]


def _finalize(sums, dataset, stages, device, with_gradcam, world_size):
    for name in stages:
        sums.add(f"active/{name}", 0.0)
        if dataset.has_foregrounds:
            sums.add(f"epg/{name}", 0.0)
    if dataset.has_foregrounds:
        sums.add("foreground_images", 0.0)
        if with_gradcam:
            sums.add("epg/gradcam", 0.0)
    if world_size > 1:
        sums.reduce(device)
    v = sums.values
    seen = v["group_seen"].sum().item()
    result = {"num_samples": int(seen), "accuracy": v["group_correct"].sum().item() / seen,
              "class_accuracy": _ratios(v["class_correct"], v["class_seen"])}
    if dataset.has_groups:
        per_group = _ratios(v["group_correct"], v["group_seen"])
        present = [a for a in per_group if a is not None]
        result.update(group_accuracy=per_group, worst_group_accuracy=min(present), mean_group_accuracy=sum(present) / len(present))
    else:
        result.update(group_accuracy=None, worst_group_accuracy=None, mean_group_accuracy=None)
    if stages:
        result["mask_active_fraction"] = {name: v[f"active/{name}"] / seen for name in stages}
    if dataset.has_foregrounds:
        count = v["foreground_images"]
        result["foreground_images"] = int(count)
        keys = stages + (["gradcam"] if with_gradcam else [])
        result["energy_pointing_game"] = {k: (v[f"epg/{k}"] / count if count else None) for k in keys}
    return result


def _ratios(correct, seen):
    """correct / seen per entry, None where nothing was seen (an empty group)."""
    return [c / s if s else None for c, s in zip(correct.tolist(), seen.tolist())]


def selection_metric(result):
    """What best.pt is chosen on: worst-group accuracy where the data has groups, else accuracy."""
    value = result["worst_group_accuracy"]
    return result["accuracy"] if value is None else value


def format_table(result, class_names, group_names):
    """The metrics as aligned text lines."""
    lines = [f"{'samples':<28} {result['num_samples']}", f"{'accuracy':<28} {result['accuracy']:.4f}"]
    if result["group_accuracy"] is not None:
        lines.append(f"{'worst-group accuracy':<28} {result['worst_group_accuracy']:.4f}")
        lines.append(f"{'mean-group accuracy':<28} {result['mean_group_accuracy']:.4f}")
        lines += [f"  group {i} {name:<18} {_num(a)}" for i, (name, a) in enumerate(zip(group_names, result["group_accuracy"]))]
    else:
        lines += [f"  class {i} {name:<18} {_num(a)}" for i, (name, a) in enumerate(zip(class_names, result["class_accuracy"]))]
    for stage, value in result.get("mask_active_fraction", {}).items():
        lines.append(f"{'mask active fraction ' + stage:<28} {value:.4f}")
    for key, value in result.get("energy_pointing_game", {}).items():
        label = "EPG GradCAM" if key == "gradcam" else f"EPG mask {key}"
        lines.append(f"{label:<28} {_num(value)}")
    return "\n".join(lines)


def _num(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def command_eval(args):
    """``aim eval``: the metrics of a checkpoint on one split, printed and optionally as JSON."""
    import json

    from aim.data import open_split
    from aim.train import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    dataset = open_split(args.data, args.split, config["image_size"], segmentations=args.segmentations,
                         check_threads=max(1, args.workers))
    if dataset.class_names != checkpoint["class_names"]:
        raise UsageError(f"{args.data}: classes {dataset.class_names[:5]} differ from the checkpoint's {checkpoint['class_names'][:5]}")
    model = model_from_checkpoint(checkpoint, args.device)
    result = evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers, device=args.device,
                      with_gradcam=not args.no_gradcam)
    result = {"checkpoint": args.checkpoint, "epoch": checkpoint["epoch"], "split": args.split, "model": config["model"], **result}
    print(f"{config['model']} ({config['backbone']}) epoch {checkpoint['epoch']} on {args.data} {args.split}")
    print(format_table(result, dataset.class_names, dataset.group_names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
