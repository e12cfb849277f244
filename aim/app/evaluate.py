"""Evaluation of a trained classifier (AIM or the baseline) on one split: accuracy, per-group
(or per-class) accuracy, worst-group and mean-group accuracy, the masks' active fractions, and
the Energy Pointing Game of each stage's mask and of GradCAM (Captum ``LayerGradCam`` on the
backbone's last stage, for both model kinds), the mask-area leak report and the exact decision
audit (:mod:`aim.analysis.audit`).

Accuracies and EPG are built from sums, the leak report and the audit from per-image values:
ranks of a multi-process run evaluate disjoint shards, and :func:`evaluate` reduces the sums
and gathers the per-image values before computing any number.
"""
import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from aim.analysis import audit, metrics
from aim.errors import UsageError
from aim.analysis.attribution import gradcam
from aim.nn.model import AIMOutput, logits_of


class _Sums:
    """Per-group correct/seen counts, per-stage mask fractions and EPG sums of one shard, and
    the per-image values (labels, groups, mask fractions, decision shares) the leak report and
    the audit need."""

    def __init__(self, num_groups, num_classes):
        self.values = {"group_correct": torch.zeros(num_groups, dtype=torch.float64),
                       "group_seen": torch.zeros(num_groups, dtype=torch.float64),
                       "class_correct": torch.zeros(num_classes, dtype=torch.float64),
                       "class_seen": torch.zeros(num_classes, dtype=torch.float64)}
        self.per_image = {}

    def add(self, name, value):
        self.values[name] = self.values.get(name, 0.0) + float(value)

    def append(self, name, values):
        self.per_image.setdefault(name, []).append(values.detach().cpu().double())

    def gathered(self, world_size):
        """The per-image values of every rank, concatenated (rank order)."""
        local = {name: torch.cat(chunks) for name, chunks in self.per_image.items()}
        if world_size == 1:
            return local
        shards = [None] * world_size
        dist.all_gather_object(shards, local)
        names = sorted({name for shard in shards for name in shard})
        return {name: torch.cat([shard[name] for shard in shards if name in shard]) for name in names}

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


def group_counts(dataset):
    """Images per group of a split (the training split's: the weights of weighted accuracy), or
    None for layouts without groups."""
    return torch.bincount(dataset.groups, minlength=dataset.num_groups).tolist() if dataset.has_groups else None


def weighted_accuracy(group_accuracy, weights):
    """The group accuracies weighted by ``weights`` (the training split's group counts), as DFR and
    JTT report WaterBirds' average accuracy: the accuracy under the training distribution of
    groups, from a test split balanced over groups."""
    pairs = [(a, w) for a, w in zip(group_accuracy, weights) if a is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(a * w for a, w in pairs) / total if total else None


@torch.no_grad()
def evaluate(model, dataset, batch_size=64, workers=0, device="cpu", amp_dtype=None, channels_last=False,
             with_gradcam=True, with_audit=True, rank=0, world_size=1, group_weights=None, per_image=False):
    """Metrics of ``model`` on ``dataset`` (an :class:`aim.data.SampleDataset`) as a JSON-ready dict.

    Keys: num_samples, accuracy, class_accuracy, group_accuracy / worst_group_accuracy /
    mean_group_accuracy (None for layouts without groups), weighted_accuracy (the group accuracies
    weighted by ``group_weights``, the training split's group counts; None without them or
    groups), mask_active_fraction {stage} and
    mask_area_leak {stage: aim.analysis.audit.mask_area_leak's entry} (AIM), energy_pointing_game
    {stage..., "gradcam"} and foreground_images (datasets with foregrounds; GradCAM only with
    ``with_gradcam``), decision_audit (datasets with foregrounds, ``with_audit``, two classes
    or more: the mean shares of the decision on the object, the background and the bias,
    overall and per group, from :func:`aim.analysis.audit.decision_shares`). GradCAM targets the true class.
    In multi-process runs every rank passes its rank and world size, evaluates its shard, and
    gets the result of the whole split; world_size 1 evaluates the whole split in this process.
    ``per_image`` adds "per_image": {name: [value per image]} in the order the ranks' shards
    interleave (dataset order with one process): labels, groups, predicted, active/<stage>,
    decision/<share> (what the leak report and the audit are computed from; ``aim report``
    picks its images by them).
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
            predicted = logits_of(output).argmax(1).cpu()
            correct = (predicted == labels).double()
            sums.values["group_correct"].index_add_(0, groups, correct)
            sums.values["group_seen"].index_add_(0, groups, torch.ones_like(correct))
            sums.values["class_correct"].index_add_(0, labels, correct)
            sums.values["class_seen"].index_add_(0, labels, torch.ones_like(correct))
            sums.append("labels", labels)
            sums.append("groups", groups)
            sums.append("predicted", predicted)
            masks = output.masks if isinstance(output, AIMOutput) else {}
            for name, mask in masks.items():
                fractions = metrics.mask_active_fraction(mask)
                sums.add(f"active/{name}", fractions.sum())
                sums.append(f"active/{name}", fractions)
            if not dataset.has_foregrounds:
                continue
            foreground = batch[3].to(device)
            if with_audit and dataset.num_classes >= 2:
                shares = audit.decision_shares(audit.decision_contributions(unwrap(model), images.float()), foreground)
                for name, values in shares.items():
                    sums.append(f"decision/{name}", values)
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
    return _finalize(sums, dataset, mask_stage_names(model), device, with_gradcam, world_size, group_weights, per_image)


def _per_image_reports(per_image, dataset, stages):
    """The leak report and the decision audit from the gathered per-image values."""
    reports = {}
    labels = per_image.get("labels", torch.zeros(0, dtype=torch.float64)).long()
    groups = per_image["groups"].long() if dataset.has_groups and "groups" in per_image else None
    if stages:
        fractions = {name: per_image.get(f"active/{name}", torch.zeros(0, dtype=torch.float64)) for name in stages}
        reports["mask_area_leak"] = audit.mask_area_leak(fractions, labels, groups, dataset.num_classes,
                                                         dataset.num_groups if groups is not None else None)
    if "decision/object" in per_image:
        index, count = (groups, dataset.num_groups) if groups is not None else (labels, dataset.num_classes)
        reports["decision_audit"] = {
            **{name: per_image[f"decision/{name}"].mean().item() for name in audit.SHARE_NAMES},
            "by_group" if groups is not None else "by_class":
                {name: audit.means_by(per_image[f"decision/{name}"], index, count) for name in audit.SHARE_NAMES}}
    return reports


def unwrap(model):
    """The module itself under torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def mask_stage_names(model):
    """Names of an AIM model's mask stages, finest first ([] for the baseline): as the backbone
    declares them (``stage_names``: a TimmBackbone's, whose ViT pyramid may build only its
    coarsest levels), else "0", "1", ... by position, as the model names a list of stages."""
    model = unwrap(model)
    if not hasattr(model, "topdown"):
        return []
    count = len(model.topdown.in_channels_list)
    names = getattr(model.backbone, "stage_names", None) or [str(i) for i in range(count)]
    return list(names[count - model.depth:])


def _finalize(sums, dataset, stages, device, with_gradcam, world_size, group_weights, per_image):
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
    gathered = sums.gathered(world_size)
    v = sums.values
    seen = v["group_seen"].sum().item()
    result = {"num_samples": int(seen), "accuracy": v["group_correct"].sum().item() / seen,
              "class_accuracy": _ratios(v["class_correct"], v["class_seen"])}
    if dataset.has_groups:
        per_group = _ratios(v["group_correct"], v["group_seen"])
        present = [a for a in per_group if a is not None]
        result.update(group_accuracy=per_group, worst_group_accuracy=min(present), mean_group_accuracy=sum(present) / len(present),
                      weighted_accuracy=None if group_weights is None else weighted_accuracy(per_group, group_weights))
    else:
        result.update(group_accuracy=None, worst_group_accuracy=None, mean_group_accuracy=None, weighted_accuracy=None)
    if stages:
        result["mask_active_fraction"] = {name: v[f"active/{name}"] / seen for name in stages}
    if dataset.has_foregrounds:
        count = v["foreground_images"]
        result["foreground_images"] = int(count)
        keys = stages + (["gradcam"] if with_gradcam else [])
        result["energy_pointing_game"] = {k: (v[f"epg/{k}"] / count if count else None) for k in keys}
    result.update(_per_image_reports(gathered, dataset, stages))
    if per_image:
        result["per_image"] = {name: values.tolist() for name, values in gathered.items()}
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
        if result.get("weighted_accuracy") is not None:
            lines.append(f"{'weighted accuracy':<28} {result['weighted_accuracy']:.4f} (groups weighted as in training)")
        lines += [f"  group {i} {name:<18} {format_number(a)}" for i, (name, a) in enumerate(zip(group_names, result["group_accuracy"]))]
    else:
        lines += [f"  class {i} {name:<18} {format_number(a)}" for i, (name, a) in enumerate(zip(class_names, result["class_accuracy"]))]
    for stage, value in result.get("mask_active_fraction", {}).items():
        lines.append(f"{'mask active fraction ' + stage:<28} {value:.4f}")
    for key, value in result.get("energy_pointing_game", {}).items():
        label = "EPG GradCAM" if key == "gradcam" else f"EPG mask {key}"
        lines.append(f"{label:<28} {format_number(value)}")
    for stage, leak in result.get("mask_area_leak", {}).items():
        lines.append(f"{'mask ' + stage + ' empty share':<28} {format_number(leak['empty_share'])}")
        lines.append(f"{'mask ' + stage + ' area AUC':<28} class {format_number(leak['auc_class'])}, background {format_number(leak['auc_background'])}")
        by = leak["active_by_group"] if leak["active_by_group"] is not None else leak["active_by_class"]
        names = group_names if leak["active_by_group"] is not None else class_names
        lines.append(f"{'mask ' + stage + ' active by ' + ('group' if leak['active_by_group'] is not None else 'class'):<28} "
                     + ", ".join(f"{n} {format_number(a)}" for n, a in zip(names, by)))
    decision = result.get("decision_audit")
    if decision is not None:
        lines.append(f"{'decision on object/bg/bias':<28} {format_number(decision['object'])} / {format_number(decision['background'])} / {format_number(decision['bias'])}")
        by_group = "by_group" in decision
        per = decision["by_group" if by_group else "by_class"]
        for i, name in enumerate(group_names if by_group else class_names):
            lines.append(f"  {'group' if by_group else 'class'} {i} {name:<18} {format_number(per['object'][i])} / "
                         f"{format_number(per['background'][i])} / {format_number(per['bias'][i])}")
    return "\n".join(lines)


def format_number(value):
    """A metric as the table prints it: 4 decimals, n/a for a missing value."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def open_split_for(checkpoint, checkpoint_path, root, split, segmentations=None, workers=0):
    """One split of the dataset in ``root`` as the checkpoint's run preprocessed its images, every
    file checked; a dataset whose classes are not the checkpoint's is a UsageError naming both."""
    from aim.data import open_split

    config = checkpoint["config"]
    dataset = open_split(root, split, config["image_size"], segmentations=segmentations, check_threads=max(1, workers),
                         preprocessing=config.get("preprocessing", "imagenet"))
    if dataset.class_names != checkpoint["class_names"]:
        raise UsageError(f"{root}: classes {dataset.class_names[:5]} differ from those of {checkpoint_path} "
                         f"{checkpoint['class_names'][:5]}: another dataset")
    return dataset


def command_eval(args):
    """``aim eval``: the metrics of a checkpoint on one split, printed and optionally as JSON."""
    import json

    from aim.config import check_device
    from aim.checkpoint import read_checkpoint, model_from_checkpoint

    check_device(args.device)
    checkpoint = read_checkpoint(args.checkpoint, f"checkpoint {args.checkpoint}")
    config = checkpoint["config"]
    dataset = open_split_for(checkpoint, args.checkpoint, args.data, args.split, args.segmentations, args.workers)
    model = model_from_checkpoint(checkpoint, args.device)
    result = evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers, device=args.device,
                      with_gradcam=not args.no_gradcam, group_weights=checkpoint.get("train_group_counts"))
    result = {"checkpoint": args.checkpoint, "epoch": checkpoint["epoch"], "split": args.split, "model": config["model"], **result}
    print(f"{config['model']} ({config['backbone']}) epoch {checkpoint['epoch']} on {args.data} {args.split}")
    print(format_table(result, dataset.class_names, dataset.group_names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
