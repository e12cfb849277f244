"""The settings of a training run (:class:`TrainConfig`), their checks, and what a checkpoint
records of them. ``aim train``'s parser, the study and the demo read their defaults here."""
import dataclasses
import math
import os

import torch

from aim.data.transforms import PREPROCESSINGS
from aim.errors import UsageError
from aim.nn.backbones import BACKBONE_NAMES
from aim.nn.timm_backbones import is_timm_name
from aim.nn.topdown import MASK_BUDGETS, POOLINGS

# A 4-stage SmallConvNet (aim.nn.backbones) for toy data and tests, next to the torchvision names.
SMALL_BACKBONE = "small_convnet"


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; config.json holds these plus the package version and commit."""

    out: str = "run"
    data: str = None
    segmentations: str = None
    model: str = "aim"              # "aim" or "baseline"
    backbone: str = "resnet50"      # a torchvision name (aim.nn.backbones.BACKBONE_NAMES), "timm:NAME" or "small_convnet"
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
    initial_mask_logit: float = 2.0  # initial bias of the mask estimators' logits (aim.nn.topdown.INITIAL_MASK_LOGIT)
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
