"""aim: the AIM module layer (ICCV 2025, arXiv 2508.11502) on top of the aim_kernels ops.

- :class:`FusedTopDownMask`: drop-in for torchvision.ops.FeaturePyramidNetwork with learned
  binary masks (fused ops, or the plain-PyTorch reference with ``use_reference=True``)
- :class:`AIM`: backbone + top-down masking pathway + per-stage classifiers
- :class:`AIMLoss`, :class:`MaskAnnealing`: the training objective and tau schedule
- :func:`load`: a model that ``aim train`` trained, from its run folder or a checkpoint file
"""
import os

from aim.backbones import BACKBONE_NAMES, SmallConvNet, build_backbone
from aim.loss import AIMLoss, AIMLossParts, MaskAnnealing
from aim.model import AIM, AIMOutput
from aim.topdown import FusedTopDownMask, MaskEstimator, TopDownResult



def load(path, device="cpu"):
    """The model (AIM or baseline) of a checkpoint written by ``aim train`` or ``aim demo``, in
    eval mode on ``device``. ``path``: a checkpoint file (best.pt, last.pt) or a run folder (its
    best.pt). A missing file or a file of another kind is an ``aim.errors.UsageError`` naming it."""
    from aim.train import load_checkpoint, model_from_checkpoint  # the application layer, loaded on use

    if os.path.isdir(path):
        path = os.path.join(path, "best.pt")
    return model_from_checkpoint(load_checkpoint(path), device)


__all__ = [
    "AIM", "AIMOutput", "AIMLoss", "AIMLossParts", "MaskAnnealing", "FusedTopDownMask", "MaskEstimator",
    "TopDownResult", "SmallConvNet", "build_backbone", "BACKBONE_NAMES", "load",
]
