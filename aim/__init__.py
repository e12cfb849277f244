"""aim: the AIM module layer (ICCV 2025, arXiv 2508.11502) on top of the aim_kernels ops.

- :class:`FusedTopDownMask`: drop-in for torchvision.ops.FeaturePyramidNetwork with learned
  binary masks (fused ops, or the plain-PyTorch reference with ``use_reference=True``)
- :class:`AIM`: backbone + top-down masking pathway + per-stage classifiers
- :class:`AIMLoss`, :class:`MaskAnnealing`: the training objective and tau schedule
- :func:`load_checkpoint`: a model that ``aim train`` trained and its metadata
- :mod:`aim.data`: the data sets (``aim.data.open_split``), :mod:`aim.analysis`: the decision audit

The layout: ``aim.nn`` (the modules), ``aim.analysis``, ``aim.data``, ``aim.config``,
``aim.checkpoint`` and ``aim.distributed`` form the library; ``aim.app`` is the `aim` command.
"""
from aim import data
from aim.checkpoint import CheckpointInfo, load_checkpoint
from aim.nn.backbones import BACKBONE_NAMES, SmallConvNet, build_backbone
from aim.nn.loss import AIMLoss, AIMLossParts, MaskAnnealing
from aim.nn.model import AIM, AIMOutput
from aim.nn.topdown import FusedTopDownMask, MaskEstimator, TopDownResult

__all__ = [
    "AIM", "AIMOutput", "AIMLoss", "AIMLossParts", "MaskAnnealing", "FusedTopDownMask", "MaskEstimator",
    "TopDownResult", "SmallConvNet", "build_backbone", "BACKBONE_NAMES", "load_checkpoint", "CheckpointInfo", "data",
]
