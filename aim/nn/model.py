"""The AIM classifier: a backbone, the top-down masking pathway, per-stage classifiers."""
from typing import NamedTuple

import torch.nn.functional as F
from torch import nn

from aim.nn.backbones import as_stage_dict, build_backbone, stage_channels_of
from aim.nn.topdown import INITIAL_MASK_LOGIT, FusedTopDownMask


class AIMOutput(NamedTuple):
    """logits: (N, num_classes) from the classifier on the final fused map F_depth (the
    prediction); stage_logits: per top-down stage, the classifier f_l on O_l; masks: per stage
    B_l, (N, 1, H_l, W_l). Both dicts are keyed by stage name, finest first."""

    logits: object
    stage_logits: dict
    masks: dict


class AIM(nn.Module):
    """AIM (ICCV 2025): a CNN whose decision uses only the spatial positions its learned binary
    masks keep, e.g. ``AIM("convnext_tiny", num_classes=2, depth=2, target=0.25)``.

    Args:
        backbone: a torchvision name (``aim.nn.backbones.BACKBONE_NAMES``: resnet18/34/50/101/152,
            convnext_tiny/small/base/large), ``"timm:NAME"`` for any timm model with stage maps
            (CNNs, Swin; plain ViTs through a simple feature pyramid; needs ``pip install .[timm]``),
            or any nn.Module returning a list/tuple or dict of NCHW stage maps, finest first
            (e.g. ``aim.build_backbone("timm:vit_tiny_patch16_224", image_size=64)``).
        num_classes: number of classes.
        depth: how many of the coarsest stages the top-down pathway runs through.
        target: mask-annealing target fraction of active mask entries.
        out_channels: width of the top-down pathway.
        mask_hidden_channels: width of each mask estimator.
        mask_blocks: residual blocks of each mask estimator.
        mask_estimator: "dense" or "separable" (``FusedTopDownMask``'s option of that name).
        temperature: Gumbel temperature.
        weights: for a backbone given by name (None: random init; a torchvision name passes any
            other value to torchvision, a timm name takes "DEFAULT", timm's pretrained=True:
            both download the pretrained weights).
        stage_channels: channels of the backbone's stages; if None, as the backbone declares them
            (a timm backbone's feature_info) or found by a probe forward.
        use_reference: run the plain-PyTorch reference ops instead of the fused ones.
        sparse_eval: in eval mode, skip every feature map: the logits need only global averages,
            which the masks and the stage maps give directly (``FusedTopDownMask.pooled_outputs``,
            exact up to rounding); ``self.topdown`` on its own computes T_l only where the mask is
            active (masked_conv2d). Same masks as the dense path, bit for bit.
        initial_mask_logit: initial bias of the mask estimators' logits.
        mask_topdown_context: the finer mask estimators also read the upsampled coarser fused
            map (``FusedTopDownMask``'s option of that name). On by default: with the paper's
            pathway (False) the finest mask's area encodes the class (docs/masks_and_audit.md).
        pooling: "all" or "active", how every classifier averages its masked map
            (``FusedTopDownMask``'s option of that name).
        mask_saliency_prior: the mask estimators add a learned multiple of the stage map's
            standardized log energy to their logits (``FusedTopDownMask``'s option of that name).
        mask_budget: "loss", "eval" or "fixed": whether the mask loss or a per-image quantile sets
            how much of each stage a mask keeps (``FusedTopDownMask``'s option of that name).
            "eval" by default: every image's eval masks keep exactly the target share of each
            stage, so their area cannot carry the class, at the accuracy of "loss" (within 1
            point over 3 seeds, docs/masks_and_audit.md).
        mask_image: run the backbone twice: the masks come from the whole image, then the image
            multiplied by the finest mask (nearest-upsampled; straight-through, so the mask
            learns from both passes) goes through the backbone again, and the pathway merges
            that pass's stage maps under the same masks. The classifiers then read features of
            the kept pixels only: a kept position's receptive field no longer brings in the
            background around it. Twice the backbone's cost.
    """

    def __init__(self, backbone, num_classes, depth=2, target=0.25, out_channels=256, mask_hidden_channels=128,
                 temperature=1.0, weights=None, stage_channels=None, use_reference=False, sparse_eval=True,
                 initial_mask_logit=INITIAL_MASK_LOGIT, mask_topdown_context=True, pooling="all",
                 mask_saliency_prior=False, mask_budget="eval", mask_blocks=3, mask_image=False,
                 mask_estimator="dense"):
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, weights=weights, stages_used=depth)
        elif not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        elif weights is not None:
            raise ValueError("weights= only applies to a backbone given by name; load weights into your module yourself")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.backbone = backbone
        channels = list(stage_channels) if stage_channels is not None else stage_channels_of(backbone)
        self.topdown = FusedTopDownMask(channels, out_channels, depth=depth, temperature=temperature, target=target,
                                        mask_hidden_channels=mask_hidden_channels, use_reference=use_reference,
                                        sparse_eval=sparse_eval, initial_mask_logit=initial_mask_logit,
                                        mask_topdown_context=mask_topdown_context, pooling=pooling,
                                        mask_saliency_prior=mask_saliency_prior, mask_budget=mask_budget,
                                        mask_blocks=mask_blocks, mask_estimator=mask_estimator)
        # One classifier per top-down stage (on O_l), finest first like the stage dicts.
        self.stage_classifiers = nn.ModuleList([nn.Linear(out_channels, num_classes) for _ in range(self.topdown.depth)])
        self.classifier = nn.Linear(out_channels, num_classes)
        self.mask_image = bool(mask_image)

    @property
    def depth(self):
        return self.topdown.depth

    @property
    def target(self):
        return self.topdown.target

    def classifier_stages(self, images):
        """(the stage maps the pathway merges, the masks it applies to them): the backbone's
        maps of ``images`` and None (the pathway estimates the masks from them), or with
        ``mask_image`` the maps of the masked image and the masks estimated on the whole one."""
        stages = as_stage_dict(self.backbone(images))
        if not self.mask_image:
            return stages, None
        masks = self.topdown.run(stages).masks
        keep = F.interpolate(next(iter(masks.values())), size=images.shape[-2:], mode="nearest")
        return as_stage_dict(self.backbone(images * keep)), masks

    def forward(self, images):
        stages, masks = self.classifier_stages(images)
        if self.topdown.sparse_eval and not self.training:
            masks, pooled, pooled_final = self.topdown.pooled_outputs(stages, masks=masks)
            stage_logits = {name: clf(p) for clf, (name, p) in zip(self.stage_classifiers, pooled.items())}
            return AIMOutput(self.classifier(pooled_final), stage_logits, dict(masks))
        result = self.topdown.run(stages, pool_stage_outputs=True, masks=masks)
        logits = self.classifier(self.topdown.pool_final(result.features, result.masks))
        stage_logits = {name: clf(pooled) for clf, (name, pooled) in zip(self.stage_classifiers, result.pooled_stage_outputs.items())}
        return AIMOutput(logits, stage_logits, dict(result.masks))


def logits_of(output):
    """The class logits of a model's output: an :class:`AIMOutput`'s, or a plain classifier's tensor."""
    return output.logits if isinstance(output, AIMOutput) else output
