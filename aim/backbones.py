"""Backbones that yield multi-scale stage maps (finest first) for the AIM top-down pathway."""
from collections import OrderedDict

import torch
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
BACKBONE_NAMES = RESNETS + CONVNEXTS


class StageBackbone(nn.Module):
    """Runs a stem and then each stage in turn; returns the list of stage outputs, finest first."""

    def __init__(self, stem, stages):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


def build_backbone(name, weights=None):
    """The feature stages of a torchvision classifier by name, as a :class:`StageBackbone`.

    ``weights`` is passed to ``torchvision.models.get_model`` unchanged (e.g. ``"DEFAULT"`` or a
    weights enum), so pretrained weights are downloaded by torchvision for users with network;
    None builds a randomly initialized backbone. The classifier head is dropped.
    """
    import torchvision

    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)} or pass an nn.Module")
    model = torchvision.models.get_model(name, weights=weights)
    if name in RESNETS:
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return StageBackbone(stem, [model.layer1, model.layer2, model.layer3, model.layer4])
    # ConvNeXt: features[0] is the stem, then (stage, downsample) pairs; the downsample layer
    # opens the next stage so each stage output is at the resolution of its blocks.
    f = model.features
    return StageBackbone(f[0], [f[1], nn.Sequential(f[2], f[3]), nn.Sequential(f[4], f[5]), nn.Sequential(f[6], f[7])])


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
        super().__init__(nn.Identity(), stages)
        self.widths = tuple(widths)


def as_stage_dict(stages):
    """A backbone's output (list/tuple or dict of NCHW maps, finest first) as an OrderedDict;
    list entries are named "0", "1", ... by position."""
    if isinstance(stages, dict):
        return OrderedDict(stages)
    if isinstance(stages, (list, tuple)):
        return OrderedDict((str(i), t) for i, t in enumerate(stages))
    raise TypeError(f"the backbone must return a list/tuple or dict of stage maps, got {type(stages).__name__}")


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
