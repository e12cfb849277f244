"""aim: the AIM module layer (ICCV 2025, arXiv 2508.11502) on top of the aim_kernels ops.

- :class:`FusedTopDownMask`: drop-in for torchvision.ops.FeaturePyramidNetwork with learned
  binary masks (fused ops, or the plain-PyTorch reference with ``use_reference=True``)
- :class:`AIM`: backbone + top-down masking pathway + per-stage classifiers
- :class:`AIMLoss`, :class:`MaskAnnealing`: the training objective and tau schedule
"""
from aim.backbones import BACKBONE_NAMES, SmallConvNet, build_backbone
from aim.loss import AIMLoss, AIMLossParts, MaskAnnealing
from aim.model import AIM, AIMOutput
from aim.topdown import FusedTopDownMask, MaskEstimator, TopDownResult

__all__ = [
    "AIM", "AIMOutput", "AIMLoss", "AIMLossParts", "MaskAnnealing", "FusedTopDownMask", "MaskEstimator",
    "TopDownResult", "SmallConvNet", "build_backbone", "BACKBONE_NAMES",
]
