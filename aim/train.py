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
import re
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import aim
from aim import metrics
from aim.data import SeededSampler
from aim.backbones import BACKBONE_NAMES, BaselineClassifier, SmallConvNet, build_backbone, load_backbone_weights, stage_channels_of
from aim.data.transforms import PREPROCESSINGS
from aim.evaluate import evaluate, group_counts, logits_of, mask_stage_names, selection_metric
from aim.errors import DataError, UsageError, first_line
from aim.timm_backbones import is_timm_name
from aim.topdown import MASK_BUDGETS, POOLINGS

CHECKPOINT_FORMAT = "aim-train-checkpoint-1"
# A 4-stage SmallConvNet (aim.backbones) for toy data and tests, next to the torchvision names.
SMALL_BACKBONE = "small_convnet"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; config.json holds these plus the package version and commit."""

    out: str = "run"
    data: str = None
    segmentations: str = None
    model: str = "aim"              # "aim" or "baseline"
    backbone: str = "resnet50"      # a torchvision name (aim.backbones.BACKBONE_NAMES), "timm:NAME" or "small_convnet"
    timm_kwargs: dict = None        # timm.create_model arguments of a timm:NAME backbone (None: none)
    weights: str = "none"           # "none", "DEFAULT" (torchvision's or timm's pretrained) or a file
    depth: int = 2
    target: float = 0.25
    topdown_channels: int = 256
    mask_channels: int = 128
    temperature: float = 1.0
    epochs: int = 30
    anneal_epochs: int = 10
    batch_size: int = 32            # global: split over the processes of a multi-process run
    lr: float = 1e-3
    backbone_lr: float = None       # None: lr
    weight_decay: float = 1e-4
    image_size: int = 224
    preprocessing: str = "imagenet"  # aim.data.transforms.PREPROCESSINGS; aim eval/explain apply it again
    workers: int = 4
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager checks capture without code generation
    freeze_bn: bool = False         # BatchNorm layers use their running statistics, which stay fixed
    threads: int = 0                # torch intra-op threads (0: torch's default)
    use_reference: bool = False     # plain-PyTorch reference ops instead of the fused ones
    initial_mask_logit: float = 2.0  # initial bias of the mask estimators' logits (aim.topdown.INITIAL_MASK_LOGIT)
    stage_loss_weight: float = 1.0  # weight of the stage classifiers' cross-entropies in AIMLoss
    warmup_epochs: int = 0          # epochs at tau = 1 (masks fully on) before the annealing starts
    select_annealed: bool = False   # AIM: best.pt only among epochs trained at the target tau
    noise_off_epochs: int = 0       # AIM: the last N epochs train without Gumbel noise (masks thresholded)
    backbone_frozen_epochs: int = 0  # the first N epochs leave the backbone's weights as they are (linear probing, then fine-tuning)
    mask_topdown_context: bool = True   # AIM: finer mask estimators also read the upsampled coarser fused map
    mask_saliency_prior: bool = False   # AIM: mask logits + a learned multiple of the stage map's standardized log energy
    per_image_mask_loss: bool = True    # AIM: mask loss on each image's active fraction, not the batch's
    pooling: str = "all"            # AIM: classifiers average over all positions ("all") or the active ones ("active")
    mask_budget: str = "eval"       # AIM: the mask loss sets each mask's area ("loss"), every image keeps exactly tau of each stage at eval ("eval") or in training too ("fixed")

    def check(self):
        if self.model not in ("aim", "baseline"):
            raise UsageError(f"--model must be aim or baseline, got {self.model!r}")
        if self.backbone not in BACKBONE_NAMES + (SMALL_BACKBONE,) and not is_timm_name(self.backbone):
            raise UsageError(f"--backbone must be timm:NAME or one of {', '.join(BACKBONE_NAMES + (SMALL_BACKBONE,))}, "
                             f"got {self.backbone!r}")
        if self.timm_kwargs is not None and not (isinstance(self.timm_kwargs, dict) and is_timm_name(self.backbone)):
            raise UsageError(f"--timm-kwargs must be a JSON object and the backbone timm:NAME, got {self.timm_kwargs!r} "
                             f"for {self.backbone}")
        if self.pooling not in POOLINGS:
            raise UsageError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.mask_budget not in MASK_BUDGETS:
            raise UsageError(f"--mask-budget must be one of {', '.join(MASK_BUDGETS)}, got {self.mask_budget!r}")
        if self.preprocessing not in PREPROCESSINGS:
            raise UsageError(f"--preprocessing must be one of {', '.join(PREPROCESSINGS)}, got {self.preprocessing!r}")
        if self.amp not in AMP_DTYPES:
            raise UsageError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise UsageError("--amp fp16 needs --device cuda (fp16 autocast with a gradient scaler); use --amp bf16 on CPU")
        if not 0 < self.target <= 1:
            raise UsageError(f"--target must be a fraction in (0, 1] (of the mask entries kept active), got {self.target}")
        if self.depth < 1:
            raise UsageError(f"--depth must be >= 1 (top-down stages), got {self.depth}")
        for name in ("lr", "backbone_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):  # 0: those weights stay as they are
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        check_device(self.device)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UsageError(f"--out {self.out}: is a file; --out names the run folder to write (or to resume)")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if min(self.anneal_epochs, self.workers, self.noise_off_epochs, self.backbone_frozen_epochs) < 0:
            raise UsageError("--anneal-epochs, --workers, --noise-off-epochs and --backbone-frozen-epochs must be >= 0")
        if self.select_annealed and self.model == "aim" and self.epochs <= self.warmup_epochs + self.anneal_epochs:
            raise UsageError(f"--select-annealed needs an epoch at the target tau: --epochs {self.epochs} must exceed "
                             f"--warmup-epochs + --anneal-epochs ({self.warmup_epochs + self.anneal_epochs})")


def check_device(device):
    """A UsageError naming --device unless ``device`` is cpu or a CUDA GPU this machine has."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda (or cuda:N), got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda (or cuda:N), got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available to PyTorch here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


# Settings that checkpoints written before they existed do not record, with the value those runs used.
SETTINGS_BEFORE_THEY_EXISTED = {"mask_budget": "loss"}


def saved_config(checkpoint):
    """The settings a checkpoint was trained with, as a dict of TrainConfig fields."""
    return {**SETTINGS_BEFORE_THEY_EXISTED, **checkpoint["config"]}


# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = ("workers", "device", "threads", "data", "segmentations")


def build_model(config, num_classes):
    """The model a config describes, randomly initialized or with its --weights loaded into the
    backbone. A failed download of DEFAULT weights, or a weights file that does not fit, is a
    ValueError with a message for the user."""
    backbone = build_run_backbone(config)
    if config.model == "baseline":
        return BaselineClassifier(backbone, num_classes)
    return aim.AIM(backbone, num_classes=num_classes, depth=config.depth, target=config.target,
                   out_channels=config.topdown_channels, mask_hidden_channels=config.mask_channels,
                   temperature=config.temperature, use_reference=config.use_reference,
                   initial_mask_logit=config.initial_mask_logit, mask_topdown_context=config.mask_topdown_context,
                   pooling=config.pooling, mask_saliency_prior=config.mask_saliency_prior,
                   mask_budget=config.mask_budget)


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
        load_backbone_weights(backbone, _load_file(config.weights, f"--weights {config.weights}"),
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


def _load_file(path, given_as):
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


def load_checkpoint(path, given_as=None):
    """A checkpoint written by :func:`fit` (last.pt or best.pt), as a dict. ``given_as``: how
    the user named the file (e.g. "checkpoint run/best.pt"), for errors; default the path."""
    given_as = given_as or path
    checkpoint = _load_file(path, given_as)
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
    config = TrainConfig(**{**saved_config(checkpoint), "weights": "none"})
    model = build_model(config, len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.to(device).eval()


class Distributed:
    """The process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        self.started_here = False
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started_here = True

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values):
        """Sum a list of floats over ranks."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.started_here:
            dist.destroy_process_group()


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
    schedule = aim.MaskAnnealing(config.target, config.anneal_epochs, warmup_epochs=config.warmup_epochs)
    criterion = aim.AIMLoss(stage_weight=config.stage_loss_weight, per_image_mask_loss=config.per_image_mask_loss)
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
            raw_model.topdown.gumbel_noise = epoch < config.epochs - config.noise_off_epochs
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
        eligible = not (is_aim and config.select_annealed) or tau == schedule.target
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
    checkpoint = load_checkpoint(last_path, f"--resume: {last_path}")
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
    from aim.visualize import save_curves

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
        annealed_by = config.warmup_epochs + config.anneal_epochs
        if config.model == "aim" and config.epochs <= annealed_by:
            last_tau = aim.MaskAnnealing(config.target, config.anneal_epochs, warmup_epochs=config.warmup_epochs)(config.epochs - 1)
            print(f"note: tau reaches --target {config.target} in epoch {annealed_by + 1} (--warmup-epochs + --anneal-epochs); "
                  f"this run ends at tau {last_tau:.2f}: pass --epochs {annealed_by + 1} or more, or a smaller --anneal-epochs",
                  flush=True)
        print(f"data: {config.data} ({type(train_set).__name__}), {len(train_set)} train / {len(val_set)} val images, "
              f"{train_set.num_classes} classes" + (f", {train_set.num_groups} groups" if train_set.has_groups else ""), flush=True)
    fit(config, train_set, val_set, resume=args.resume)

