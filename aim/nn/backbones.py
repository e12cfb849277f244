"""Backbones that yield multi-scale stage maps (finest first) for the AIM top-down pathway."""
from collections import OrderedDict

import torch
from torch import nn

from aim.errors import UsageError
from aim.nn.timm_backbones import PYRAMID_LEVELS, build_timm_backbone, is_timm_name

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
BACKBONE_NAMES = RESNETS + CONVNEXTS


class StageBackbone(nn.Module):
    """A classifier's feature layers under their own parameter names, returning the stage maps,
    finest first (as torchvision's ``IntermediateLayerGetter`` does for detection backbones).

    ``layers``: the model's children to run, in order, by their names in the model (so a state
    dict of the full classifier loads with ``strict=True`` once its head keys are dropped);
    ``return_layers``: the names whose outputs are the stages. A name "a.i" returns the output
    of item i of the sequential child "a" (ConvNeXt keeps its stages inside ``features``).
    """

    def __init__(self, layers, return_layers):
        super().__init__()
        for name, module in layers.items():
            self.add_module(name, module)
        self.return_layers = tuple(return_layers)
        known = set(self._steps())
        unknown = [name for name in self.return_layers if name not in known]
        if unknown:
            raise ValueError(f"return_layers {unknown} are not among the layers {sorted(known)}")

    def _steps(self):
        """(name, module) in execution order; sequential children whose items are returned are
        run item by item."""
        unrolled = {name.split(".")[0] for name in self.return_layers if "." in name}
        steps = {}
        for name, child in self.named_children():
            if name in unrolled:
                steps.update((f"{name}.{i}", item) for i, item in enumerate(child))
            else:
                steps[name] = child
        return steps

    def forward(self, x):
        outputs = []
        last = self.return_layers[-1]
        for name, module in self._steps().items():
            x = module(x)
            if name in self.return_layers:
                outputs.append(x)
                if name == last:
                    break
        return outputs

    @property
    def last_stage(self):
        """The module whose output is the coarsest stage map (GradCAM's layer)."""
        return self._steps()[self.return_layers[-1]]

    def backbone_state_of_classifier(self, state):
        """A torchvision classifier's state dict without its head: the names are the same."""
        return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}

    # Layers of the backbone that a classifier's state dict does not hold (a TimmBackbone's pyramid).
    new_parameter_prefixes = ()


def build_backbone(name, weights=None, stages_used=None, image_size=None, **timm_kwargs):
    """The feature stages of a classifier by name: a torchvision name (``BACKBONE_NAMES``) as a
    :class:`StageBackbone` with torchvision's parameter names (``conv1.weight``,
    ``layer1.0.conv1.weight``, ``features.1.0...``), or ``"timm:NAME"`` as an
    :class:`aim.nn.timm_backbones.TimmBackbone` (any timm model with stage maps, e.g.
    ``timm:swin_tiny_patch4_window7_224``). The classifier head is dropped.

    ``weights``: None builds a randomly initialized backbone; a torchvision name passes it to
    ``torchvision.models.get_model`` unchanged (e.g. ``"DEFAULT"`` or a weights enum), a timm name
    takes ``"DEFAULT"`` (timm's ``pretrained=True``); either downloads for users with network.
    ``stages_used``: how many of the coarsest stages the model reads (AIM's depth, 1 for the
    baseline; None: all); a backbone whose stages exist for their reader alone, a plain ViT's
    pyramid, builds only those. ``image_size`` and ``timm_kwargs`` (``timm.create_model``
    arguments, e.g. ``depth=2``) apply to timm names only (see
    :func:`aim.nn.timm_backbones.build_timm_backbone`).
    """
    if is_timm_name(name):
        if weights not in (None, "DEFAULT"):
            raise ValueError(f"weights for {name} must be None or 'DEFAULT' (timm's pretrained=True), got {weights!r}; "
                             f"choose a timm weight tag in the name, e.g. timm:resnet18.a1_in1k")
        return build_timm_backbone(name.removeprefix("timm:"), pretrained=weights == "DEFAULT", image_size=image_size,
                                   pyramid_levels=min(stages_used or PYRAMID_LEVELS, PYRAMID_LEVELS), **timm_kwargs)
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}, timm:NAME, "
                         f"or pass an nn.Module")
    if timm_kwargs:
        raise ValueError(f"{', '.join(timm_kwargs)}: model arguments apply to timm:NAME backbones only, not {name}")
    import torchvision

    model = torchvision.models.get_model(name, weights=weights)
    if name in RESNETS:
        layers = OrderedDict((n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"))
        return StageBackbone(layers, ["layer1", "layer2", "layer3", "layer4"])
    # ConvNeXt: features[0] is the stem, then (stage, downsample) pairs; a stage map is the
    # output of a stage's blocks, before the next downsampling layer.
    return StageBackbone(OrderedDict(features=model.features), ["features.1", "features.3", "features.5", "features.7"])


# Parameters of a torchvision classifier's head, which a backbone does not have.
HEAD_PREFIXES = ("fc.", "classifier.")


class SmallConvNet(StageBackbone):
    """A small 4-stage CNN (strides 2, 4, 8, 16) for toy data and tests: per stage a strided
    3x3 conv and a 3x3 conv, each with BatchNorm and ReLU."""

    def __init__(self, widths=(16, 32, 64, 128), in_channels=3):
        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        stages, cin = [], in_channels
        for width in widths:
            stages.append(nn.Sequential(*conv(cin, width, 2), *conv(width, width, 1)))
            cin = width
        super().__init__(OrderedDict(stages=nn.Sequential(*stages)), [f"stages.{i}" for i in range(len(widths))])
        self.widths = tuple(widths)


def as_stage_dict(stages):
    """A backbone's output (list/tuple or dict of NCHW maps, finest first) as an OrderedDict;
    list entries are named "0", "1", ... by position."""
    if isinstance(stages, dict):
        return OrderedDict(stages)
    if isinstance(stages, (list, tuple)):
        return OrderedDict((str(i), t) for i, t in enumerate(stages))
    raise TypeError(f"the backbone must return a list/tuple or dict of stage maps, got {type(stages).__name__}")


def stage_channels_of(backbone):
    """Channels of each stage map: as the backbone declares them (``stage_channels``: a
    TimmBackbone's, from timm's feature_info), else probed."""
    declared = getattr(backbone, "stage_channels", None)
    return list(declared) if declared is not None else probe_stage_channels(backbone)


def probe_stage_channels(backbone, in_channels=3, size=64):
    """Channels of each stage map, found by one no-grad forward of a small zero image in eval
    mode (so BatchNorm statistics are not touched); the backbone's mode is restored."""
    was_training = backbone.training
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    backbone.eval()
    try:
        with torch.no_grad():
            stages = as_stage_dict(backbone(torch.zeros(1, in_channels, size, size, device=device, dtype=dtype)))
    finally:
        backbone.train(was_training)
    return [t.shape[1] for t in stages.values()]


class BaselineClassifier(nn.Module):
    """The baseline: the same backbone, global average pool of its last stage, linear."""

    def __init__(self, backbone, num_classes, channels=None):
        super().__init__()
        self.backbone = backbone
        channels = channels if channels is not None else stage_channels_of(backbone)[-1]
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images):
        return self.fc(as_stage_dict(self.backbone(images)).popitem()[1].mean(dim=(2, 3)))


def backbone_state_from(backbone, state, source):
    """(the entries of ``state`` under ``backbone``'s names, the names they must cover): a
    classifier's state dict (torchvision's, or timm's for a TimmBackbone) less its head, or an
    ``aim train`` checkpoint of either model kind (its ``backbone.`` entries). Either may leave
    out the backbone's new layers (``new_parameter_prefixes``: a ViT's pyramid, AIM's own like
    the pathway), which then keep their initialization. ``source`` names the file in errors."""
    if not isinstance(state, dict):
        raise UsageError(f"{source}: expected a state dict or an `aim train` checkpoint, got {type(state).__name__}")
    if "model" in state and "config" in state:  # an `aim train` checkpoint
        prefix = "backbone."
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    else:
        weights = backbone.backbone_state_of_classifier(state)
    new_layers = tuple(backbone.new_parameter_prefixes)
    return weights, [k for k in backbone.state_dict() if not k.startswith(new_layers)]


def load_backbone_weights(backbone, state, source):
    """Load :func:`backbone_state_from` into ``backbone``; a state that matches no parameter name,
    leaves some missing or has entries the backbone cannot place is a ValueError naming
    ``source`` and the keys."""
    weights, expected = backbone_state_from(backbone, state, source)
    if not weights.keys() & set(expected):
        raise UsageError(f"{source}: none of its {len(weights)} entries names a parameter of the backbone "
                         f"(e.g. {next(iter(weights), '(empty)')!r} vs {expected[0]!r}): a different architecture?")
    missing, unexpected = sorted(set(expected) - weights.keys()), sorted(weights.keys() - backbone.state_dict().keys())
    if missing or unexpected:
        raise UsageError(f"{source}: does not fit the backbone: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        # Not strict only for the new layers (``expected`` leaves them out): every other key was checked above.
        backbone.load_state_dict(weights, strict=len(expected) == len(backbone.state_dict()))
    except RuntimeError as error:  # shape mismatches
        raise UsageError(f"{source}: does not fit the backbone: {str(error).splitlines()[-1].strip()}") from None
