"""The one training loop (``aim train`` and ``aim demo``): AIM or the baseline, one process or
DistributedDataParallel under torchrun, AMP, channels_last, torch.compile, atomic checkpoints
and exact resume.

Exact resume: the data order and every sample's augmentation are functions of (seed, epoch,
index) only (:class:`aim.data.SeededSampler`), and a checkpoint holds the model, optimizer,
scheduler, gradient scaler, the epoch (which fixes the annealed tau) and every process's RNG
states (the Gumbel noise draws from them). A run killed at any moment continues from the last
completed epoch and ends with the weights of an uninterrupted run (bit-identical on CPU at a
fixed thread count).
"""
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from aim.analysis import metrics
from aim.nn.backbones import stage_channels_of
from aim.nn.loss import AIMLoss, MaskAnnealing
from aim.app.evaluate import evaluate, group_counts, mask_stage_names, selection_metric
from aim.nn.model import logits_of
from aim.checkpoint import (CHECKPOINT_FORMAT, atomic_write, build_model, build_run_backbone, non_finite_tensors,
                            read_checkpoint, remove_stale_temporaries, save_json)
from aim.config import AMP_DTYPES, REMOVED_SETTINGS, RESUMABLE_CHANGES, TrainConfig, saved_config
from aim.data import SeededSampler
from aim.distributed import Distributed
from aim.errors import DataError, UsageError


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def set_train_mode(model, freeze_bn):
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_optimizer(config, model):
    """AdamW; the backbone at --backbone-lr (default --lr), everything else at --lr."""
    backbone = [p for p in model.backbone.parameters()]
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in ids]
    backbone_lr = config.lr if config.backbone_lr is None else config.backbone_lr
    groups = [{"params": backbone, "lr": backbone_lr, "name": "backbone"}, {"params": rest, "lr": config.lr, "name": "head"}]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def run_metadata():
    """The package version and git commit (when run from a checkout) for config.json."""
    from importlib import metadata

    try:
        version = metadata.version("aim-kernels")
    except metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": version, "git_commit": commit, "torch": torch.__version__}


class _Progress:
    """A tqdm bar per epoch with running loss and images/s; off when stdout is not a terminal."""

    def __init__(self, loader, epoch, epochs, enabled):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)

    def update(self, sums, images_per_image_here, elapsed):
        """sums: (loss * n, correct, n) so far on this rank, which sees one image in
        ``images_per_image_here`` of the global batch."""
        if self.bar is not None:
            loss, seen = sums[0].item(), sums[2].item()
            self.bar.set_postfix(loss=f"{loss / seen:.3f}", img_s=f"{seen * images_per_image_here / elapsed:.0f}", refresh=False)
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def fit(config, train_set, val_set, resume=False, log=print):
    """Train per ``config`` on ``train_set``, selecting best.pt on ``val_set`` (both
    :class:`aim.data.SampleDataset`). Writes config.json, log.jsonl, last.pt, best.pt and
    curves.png into ``config.out`` (rank 0 only). Returns (the trained model, the history).
    With ``resume`` it continues from ``out/last.pt``."""
    config.check()
    ranks = Distributed(config.device)
    threads = torch.get_num_threads()
    try:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        return _fit(config, train_set, val_set, resume, ranks, log if ranks.main else (lambda *a, **k: None))
    finally:
        torch.set_num_threads(threads)
        ranks.close()


def _fit(config, train_set, val_set, resume, ranks, log):
    if config.batch_size % ranks.world_size:
        raise UsageError(f"--batch-size {config.batch_size} must be divisible by the {ranks.world_size} processes")
    last_path = os.path.join(config.out, "last.pt")
    checkpoint = _resume_point(config, resume, last_path, ranks)
    device = ranks.device
    per_rank_batch = config.batch_size // ranks.world_size
    sampler = SeededSampler(train_set, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=config.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))
    if len(loader) == 0:
        fitting = len(train_set) // ranks.world_size * ranks.world_size
        raise UsageError(f"--batch-size {config.batch_size}: the training split has only {len(train_set)} images, fewer than "
                         f"one batch; pass --batch-size {fitting} or less")
    # Gumbel noise of each rank draws from its own generator.
    torch.manual_seed(config.seed + ranks.rank)
    random.seed(config.seed + ranks.rank)
    model = build_model(config, train_set.num_classes).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
    schedule = MaskAnnealing(config.target, config.anneal_epochs)
    criterion = AIMLoss(stage_weight=config.stage_loss_weight, per_image_mask_loss=config.per_image_mask_loss)
    history, best, start_epoch = [], None, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, best, start_epoch = checkpoint["history"], checkpoint["best"], checkpoint["epoch"]
        set_rng_state(checkpoint["rng"][ranks.rank])
        log(f"resumed {last_path} after epoch {start_epoch}")
    if ranks.main:
        os.makedirs(config.out, exist_ok=True)
        remove_stale_temporaries(config.out)
        save_json(os.path.join(config.out, "config.json"), {**dataclasses.asdict(config), **run_metadata()})
        # The log holds exactly the checkpointed epochs: lines of an epoch cut short are dropped.
        atomic_write(os.path.join(config.out, "log.jsonl"), lambda tmp: _write_lines(tmp, history))

    raw_model = model
    if ranks.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model, backend=config.compile_backend)
    amp_dtype = AMP_DTYPES[config.amp]
    is_aim = config.model == "aim"

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        set_train_mode(model, config.freeze_bn)
        tau = schedule(epoch)
        if is_aim:
            if config.mask_budget != "loss":  # the masks keep the annealed tau (this epoch's val; training too with "fixed")
                raw_model.topdown.active_fraction.fill_(tau)
        backbone_frozen = epoch < config.backbone_frozen_epochs
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        # Summed on the device: reading them every step would synchronize a GPU.
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        active = torch.zeros(len(mask_stage_names(raw_model)), dtype=torch.float64, device=device)
        progress = _Progress(loader, epoch, config.epochs, ranks.main)
        for batch in loader:  # (images, labels, groups[, foregrounds])
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
                loss = criterion(output, labels, tau).total if is_aim else nn.functional.cross_entropy(output, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if backbone_frozen:
                for p in raw_model.backbone.parameters():  # AdamW skips a parameter without a gradient: no step, no decay
                    p.grad = None
            scaler.step(optimizer)
            scaler.update()
            n = labels.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += (logits_of(output).argmax(1) == labels).sum()
            sums[2] += n
            if is_aim:
                active += torch.stack([metrics.mask_active_fraction(m).sum() for m in output.masks.values()]).double()
            progress.update(sums, ranks.world_size, time.perf_counter() - started)
        progress.close()
        scheduler.step()
        diverged = non_finite_tensors(raw_model.state_dict().values()).item()
        totals = ranks.all_sum(sums.tolist() + active.tolist() + [diverged])  # one synchronization per epoch
        seen = totals[2]
        # Checked once an epoch, not every step (which would synchronize a GPU each step): the
        # epoch that went non-finite is neither evaluated nor written, so no file holds it.
        if not math.isfinite(totals[0]) or totals[-1]:
            kept = f"{config.out} keeps epoch {epoch}" if epoch else "no epoch finished"
            raise UsageError(f"--lr {config.lr}: training diverged in epoch {epoch + 1} (non-finite loss or weights) and "
                             f"stopped; {kept}; train again with a lower --lr")
        train_time = time.perf_counter() - started
        val = evaluate(model, val_set, batch_size=per_rank_batch, workers=config.workers, device=device,
                       amp_dtype=amp_dtype, channels_last=config.channels_last, with_gradcam=False,
                       rank=ranks.rank, world_size=ranks.world_size, group_weights=group_counts(train_set))
        row = {"epoch": epoch + 1, "loss": totals[0] / seen, "train_accuracy": totals[1] / seen, "lr": lrs,
               "tau": tau if is_aim else None,
               "mask_active_fraction": dict(zip(mask_stage_names(raw_model), [a / seen for a in totals[3:-1]])) if is_aim else None,
               "val": val, "train_images_per_s": seen / train_time, "time_s": time.perf_counter() - started}
        history.append(row)
        score = selection_metric(val)
        # An AIM model whose masks have not reached the target is not AIM[depth, target] yet.
        eligible = not (is_aim and config.select_annealed and config.epochs > config.anneal_epochs) or tau == schedule.target
        improved = eligible and (best is None or score > best["score"])
        if improved:
            best = {"epoch": epoch + 1, "score": score}
        rngs = ranks.gather(rng_state())
        if ranks.main:
            _write_epoch(config, raw_model, optimizer, scheduler, scaler, history, best, improved, rngs, train_set)
        ranks.barrier()
        log(_summary_line(row, config.epochs, best))
    return raw_model, history


def _resume_point(config, resume, last_path, ranks):
    exists = os.path.isfile(last_path)
    if not resume:
        if exists:
            raise UsageError(f"{config.out} already holds a run ({last_path}); pass --resume to continue it or choose another --out")
        return None
    if not exists:
        raise UsageError(f"--resume: {last_path}: no such file")
    checkpoint = read_checkpoint(last_path, f"--resume: {last_path}")
    used = [f"--{k.replace('_', '-')} {checkpoint['config'][k]}" for k, off in REMOVED_SETTINGS.items()
            if checkpoint["config"].get(k, off) != off]
    if used:
        raise UsageError(f"--resume: the run in {config.out} used {', '.join(used)}, a setting this version no longer has")
    saved = saved_config(checkpoint)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(config).items()
               if k not in RESUMABLE_CHANGES and saved.get(k, getattr(TrainConfig, k)) != v]
    if changed:
        raise UsageError(f"--resume: settings differ from the run in {config.out}: {'; '.join(changed)}")
    if len(checkpoint["rng"]) != ranks.world_size:
        raise UsageError(f"--resume: {last_path} was written by {len(checkpoint['rng'])} processes, this run has {ranks.world_size}")
    return checkpoint


def _write_lines(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _write_epoch(config, model, optimizer, scheduler, scaler, history, best, improved, rngs, train_set):
    """log.jsonl line, best.pt (if improved), last.pt, curves.png. last.pt goes last: a kill
    before it re-runs the epoch, which rewrites the others identically."""
    with open(os.path.join(config.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(history[-1]) + "\n")
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config), "model": model.state_dict(),
                  "epoch": len(history), "class_names": train_set.class_names, "group_names": train_set.group_names,
                  "has_groups": train_set.has_groups, "val": history[-1]["val"],
                  "train_group_counts": group_counts(train_set)}
    if improved:
        atomic_write(os.path.join(config.out, "best.pt"), lambda tmp: torch.save(checkpoint, tmp))
    checkpoint.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                      history=history, best=best, rng=rngs)
    from aim.app.visualize import save_curves

    save_curves(history, os.path.join(config.out, "curves.png"))
    atomic_write(os.path.join(config.out, "last.pt"), lambda tmp: torch.save(checkpoint, tmp))


def _summary_line(row, epochs, best):
    val = row["val"]
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"train acc {row['train_accuracy']:.3f}"]
    if row["tau"] is not None:
        fractions = "/".join(f"{v:.2f}" for v in row["mask_active_fraction"].values())
        parts.append(f"tau {row['tau']:.2f} active {fractions}")
    parts.append(f"val acc {val['accuracy']:.3f}")
    if val["worst_group_accuracy"] is not None:
        parts.append(f"worst group {val['worst_group_accuracy']:.3f}")
    leak = val.get("mask_area_leak")
    if leak:
        def auc(value):
            return "-" if value is None else f"{value:.2f}"
        parts.append("val empty " + "/".join(f"{v['empty_share']:.2f}" for v in leak.values())
                     + " area AUC class " + "/".join(auc(v["auc_class"]) for v in leak.values()))
    if val.get("decision_audit"):
        parts.append(f"on object {val['decision_audit']['object']:.2f}")
    parts += [f"{row['train_images_per_s']:.0f} img/s", f"{row['time_s']:.0f} s", f"best epoch {best['epoch'] if best else '-'}"]
    return " | ".join(parts)


def command_train(args):
    """``aim train``: check the data (before anything is written), then :func:`fit`."""
    from aim.data import open_split

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    config.check()
    # A download that cannot happen, a weights file that does not fit or a --depth beyond the
    # backbone's stages fails now, before the data is read.
    stages = len(stage_channels_of(build_run_backbone(config)))
    if config.model == "aim" and config.depth > stages:
        raise UsageError(f"--depth {config.depth}: the {config.backbone} backbone has {stages} stages; use --depth 1..{stages}")
    threads = max(1, config.workers)
    train_set = open_split(config.data, "train", config.image_size, augment=True, check_threads=threads,
                           preprocessing=config.preprocessing)
    val_set = open_split(config.data, "val", config.image_size, segmentations=config.segmentations, check_threads=threads,
                         preprocessing=config.preprocessing)
    if val_set.class_names != train_set.class_names:
        raise UsageError(f"{config.data}: the val split's classes differ from the train split's")
    for split, dataset in (("train", train_set), ("val", val_set)):  # else best.pt would be chosen on some classes only
        present = set(dataset.labels.unique().tolist())
        missing = [name for label, name in enumerate(dataset.class_names) if label not in present]
        if missing:
            raise DataError(f"{config.data}: the {split} split has no images of class{'es' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}; training and selecting best.pt need every class in train and val")
    if os.environ.get("RANK", "0") == "0":
        annealed_by = config.anneal_epochs
        if config.model == "aim" and config.epochs <= annealed_by:
            last_tau = MaskAnnealing(config.target, config.anneal_epochs)(config.epochs - 1)
            print(f"note: tau reaches --target {config.target} in epoch {annealed_by + 1} (--anneal-epochs); "
                  f"this run ends at tau {last_tau:.2f}, so best.pt is chosen among all its epochs: pass --epochs "
                  f"{annealed_by + 1} or more, or a smaller --anneal-epochs",
                  flush=True)
        print(f"data: {config.data} ({type(train_set).__name__}), {len(train_set)} train / {len(val_set)} val images, "
              f"{train_set.num_classes} classes" + (f", {train_set.num_groups} groups" if train_set.has_groups else ""), flush=True)
    fit(config, train_set, val_set, resume=args.resume)

