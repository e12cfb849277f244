"""The settings of a training run (:class:`TrainConfig`), their checks, and what a checkpoint
records of them. ``aim train``'s parser, the study and the demo read their defaults here."""
import dataclasses
import difflib
import json
import math
import os

import torch

from aim.data.transforms import PREPROCESSINGS
from aim.errors import UsageError, first_line
from aim.nn.backbones import BACKBONE_NAMES
from aim.nn.timm_backbones import is_timm_name
from aim.nn.topdown import MASK_BUDGETS, MASK_ESTIMATORS, POOLINGS

# A 4-stage SmallConvNet (aim.nn.backbones) for toy data and tests, next to the torchvision names.
SMALL_BACKBONE = "small_convnet"


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHWAY_LAYERS = ("all", "lateral")  # what --pathway-weights starts: the whole pathway, or its lateral convs


# The groups of settings, as ``aim train --help`` shows them.
RUN = "the run"
SYSTEM = "hardware and speed"
METHOD = "AIM's method: the top-down pathway, its masks and the loss (AIM only)"
STUDY = "research knobs of the study: schedules and model selection"


def setting(default, help, group=RUN, **flag):
    """A TrainConfig field: its default, its --help line and group, and what else its command-line
    flag needs (choices, metavar, required). The parser of ``aim train`` is generated from these."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **flag})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run, the one source of their defaults; config.json holds these plus the
    package version and commit, and ``aim train --config FILE`` reads them back."""

    data: str = setting(None, "the dataset folder (metadata.csv: WaterBirds layout; else DIR/train/<class>/, DIR/val/<class>/)",
                        metavar="DIR", required=True)
    out: str = setting("run", "run folder: config.json, log.jsonl, last.pt, best.pt, curves.png", metavar="RUN", required=True)
    segmentations: str = setting(None, "foreground masks: val pointing game per epoch", metavar="DIR")
    model: str = setting("aim", "AIM, or the backbone with a linear classifier on its last stage", choices=("aim", "baseline"))
    backbone: str = setting("resnet50", f"{', '.join(BACKBONE_NAMES + (SMALL_BACKBONE,))}, or timm:NAME for any timm model with "
                            "stage maps (small_convnet: for toy data), e.g. timm:convnext_atto, "
                            "timm:swin_tiny_patch4_window7_224, timm:vit_tiny_patch16_224 (pip install .[timm])", metavar="NAME")
    timm_kwargs: dict = setting(None, 'timm.create_model arguments of a timm:NAME backbone, e.g. \'{"drop_path_rate": 0.1}\' '
                                "(img_size follows --image-size for models bound to one input size)", metavar="JSON")
    weights: str = setting("none", "backbone weights: none, torchvision's or timm's pretrained (DEFAULT, needs network), or a "
                           "torchvision or timm state dict / `aim train` checkpoint file", metavar="none|DEFAULT|PATH")
    pathway_weights: str = setting("none", "an `aim train` checkpoint of AIM whose top-down pathway (lateral convolutions "
                                   "and mask estimators: where its masks go) starts this run's, e.g. one trained on "
                                   "unbiased data; the classifiers start new", metavar="none|PATH")
    pathway_layers: str = setting("all", "which layers --pathway-weights starts: all of the pathway's, or the lateral "
                                  "convolutions only (the mask estimators start new)", choices=PATHWAY_LAYERS)
    depth: int = setting(2, "top-down stages (AIM[depth, target])")
    target: float = setting(0.25, "mask-annealing target tau (fraction of active entries)")
    epochs: int = setting(30, "training epochs")
    anneal_epochs: int = setting(10, "epochs over which tau goes from 1.0 to --target")
    batch_size: int = setting(32, "global batch (split over the processes of a multi-process run)")
    lr: float = setting(1e-3, "AdamW learning rate (cosine decay over the run)")
    backbone_lr: float = setting(None, "learning rate of the backbone (default: --lr)")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    image_size: int = setting(224, "side of the square images the model sees")
    preprocessing: str = setting("imagenet", "imagenet: random resized crop + flip in training, resize + center crop in "
                                 "evaluation, ImageNet normalization (group_DRO's); raw: images as they are (--image-size "
                                 "square, values in [0, 1]), as `aim demo` trains on the embedded benchmark (`aim data "
                                 "embedded` writes it); aim eval and explain apply the run's again", choices=PREPROCESSINGS)
    seed: int = setting(0, "seeds the initialization, data order, augmentation and noise")

    workers: int = setting(4, "DataLoader worker processes", SYSTEM)
    device: str = setting("cpu", "cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)", SYSTEM)
    amp: str = setting("none", "autocast dtype (fp16: CUDA only)", SYSTEM, choices=("none", "bf16", "fp16"))
    channels_last: bool = setting(False, "channels_last memory format (faster convolutions on GPUs)", SYSTEM)
    compile: bool = setting(False, "torch.compile the whole model", SYSTEM)
    compile_backend: str = setting("inductor", "torch.compile backend (aot_eager: graph capture and AOTAutograd without "
                                   "code generation)", SYSTEM)
    threads: int = setting(0, "torch intra-op CPU threads (0: as many as torch picks)", SYSTEM)

    topdown_channels: int = setting(256, "width of the top-down pathway", METHOD)
    mask_channels: int = setting(128, "width of each mask estimator", METHOD)
    mask_blocks: int = setting(3, "residual blocks of each mask estimator (fewer: cheaper)", METHOD)
    mask_estimator: str = setting("dense", "dense: the paper's mask estimators (3x3 convolutions); separable: a 1x1 stem "
                                  "and depthwise-separable residual blocks, ~1/10 of their multiply-adds", METHOD,
                                  choices=MASK_ESTIMATORS)
    mask_image: bool = setting(False, "run the backbone a second time on the image masked by the finest mask, so the "
                               "classifiers read features of the kept pixels only (twice the backbone's cost)", METHOD)
    temperature: float = setting(1.0, "Gumbel temperature", METHOD)
    initial_mask_logit: float = setting(2.0, "initial bias of the mask estimators' logits "
                                        "(aim.nn.topdown.INITIAL_MASK_LOGIT)", METHOD)
    stage_loss_weight: float = setting(1.0, "weight of the stage classifiers' cross-entropies in AIMLoss", METHOD)
    mask_topdown_context: bool = setting(True, "finer mask estimators also read the upsampled coarser fused map "
                                         "(docs/masks_and_audit.md)", METHOD)
    mask_saliency_prior: bool = setting(False, "mask logits also get a learned multiple of each stage map's standardized "
                                        "log energy, so the weakest positions drop first as tau anneals", METHOD)
    per_image_mask_loss: bool = setting(True, "mask loss on each image's active fraction; --no-per-image-mask-loss: on "
                                        "the batch's, the paper's term, whose masks can encode the class in their area",
                                        METHOD)
    pooling: str = setting("all", "classifiers average the masked map over all positions or over the active ones only",
                           METHOD, choices=POOLINGS)
    mask_budget: str = setting("eval", "'loss' (the paper's): the mask loss pulls each mask's area towards tau; 'eval': "
                               "so in training, and at eval every image keeps exactly tau of each stage's positions (its "
                               "highest logits), so the area carries nothing; 'fixed': exactly tau in training too",
                               METHOD, choices=MASK_BUDGETS)
    use_reference: bool = setting(False, "plain-PyTorch reference ops instead of the fused ones", METHOD)
    select_annealed: bool = setting(True, "select best.pt only among the epochs trained at the target tau, the model the "
                                    "masks define (a run that never reaches it: among all epochs); "
                                    "--no-select-annealed: among all epochs", METHOD)

    backbone_frozen_epochs: int = setting(0, "the first N epochs train all but the backbone's weights (its BatchNorm "
                                          "statistics still adapt), then the whole network: linear probing, then "
                                          "fine-tuning", STUDY)
    freeze_bn: bool = setting(False, "keep BatchNorm statistics fixed (eval mode) while training", STUDY)

    def check(self):
        if self.model not in ("aim", "baseline"):
            raise UsageError(f"--model must be aim or baseline, got {self.model!r}")
        if self.backbone not in BACKBONE_NAMES + (SMALL_BACKBONE,) and not is_timm_name(self.backbone):
            raise UsageError(f"--backbone must be timm:NAME or one of {', '.join(BACKBONE_NAMES + (SMALL_BACKBONE,))}, "
                             f"got {self.backbone!r}")
        if self.pathway_weights != "none" and self.model != "aim":
            raise UsageError(f"--pathway-weights applies to --model aim only (a baseline has no top-down pathway), "
                             f"got it with --model {self.model}")
        if self.pathway_layers not in PATHWAY_LAYERS:
            raise UsageError(f"--pathway-layers must be one of {', '.join(PATHWAY_LAYERS)}, got {self.pathway_layers!r}")
        if self.timm_kwargs is not None and not (isinstance(self.timm_kwargs, dict) and is_timm_name(self.backbone)):
            raise UsageError(f"--timm-kwargs must be a JSON object and the backbone timm:NAME, got {self.timm_kwargs!r} "
                             f"for {self.backbone}")
        if self.pooling not in POOLINGS:
            raise UsageError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.mask_estimator not in MASK_ESTIMATORS:
            raise UsageError(f"--mask-estimator must be one of {', '.join(MASK_ESTIMATORS)}, got {self.mask_estimator!r}")
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
        if min(self.anneal_epochs, self.workers, self.backbone_frozen_epochs) < 0:
            raise UsageError("--anneal-epochs, --workers and --backbone-frozen-epochs must be >= 0")


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
SETTINGS_BEFORE_THEY_EXISTED = {"mask_budget": "loss", "mask_blocks": 3, "mask_image": False, "pathway_weights": "none",
                                "pathway_layers": "all", "mask_estimator": "dense"}


# Settings that no longer exist, with the value that meant "off": a checkpoint that recorded them
# still loads; a run that used them cannot be resumed.
REMOVED_SETTINGS = {"warmup_epochs": 0, "noise_off_epochs": 0}


def saved_config(checkpoint):
    """The settings a checkpoint was trained with, as a dict of TrainConfig fields."""
    return {k: v for k, v in {**SETTINGS_BEFORE_THEY_EXISTED, **checkpoint["config"]}.items() if k not in REMOVED_SETTINGS}


# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = ("workers", "device", "threads", "data", "segmentations")


# What config.json records beside the settings (aim.app.train.run_metadata): read back, it is skipped.
RUN_METADATA = ("version", "git_commit", "torch")
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def read_config_file(path):
    """The settings of a JSON or YAML file (``aim train --config``) as a dict of TrainConfig
    fields, each of its field's type: a run's config.json reads back as it was written. An
    unreadable file, an unknown key or a value of the wrong type is a UsageError naming the file."""
    given_as = f"--config {path}"
    if not os.path.isfile(path):
        raise UsageError(f"{given_as}: no such file")
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                settings = yaml.safe_load(f)
            else:
                settings = json.load(f)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise UsageError(f"{given_as}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                         f"({first_line(error)})") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{given_as}: must hold a mapping of settings (name: value), got {type(settings).__name__}")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    result = {}
    for name, value in settings.items():
        if name in RUN_METADATA or (name in REMOVED_SETTINGS and value == REMOVED_SETTINGS[name]):
            continue
        if name in REMOVED_SETTINGS:
            raise UsageError(f"{given_as}: {name} {value!r}: this version no longer has that setting")
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            raise UsageError(f"{given_as}: unknown setting {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kind, default = fields[name].type, fields[name].default
        fits = (value is None and default is None) or (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise UsageError(f"{given_as}: {name} must be {TYPE_NAMES[kind]}, got {value!r}")
        result[name] = float(value) if kind is float and value is not None else value
    return result
