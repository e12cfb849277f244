"""AIM's training objective and mask-annealing schedule."""
import math
from typing import NamedTuple

import torch.nn.functional as F
from torch import nn

from aim_kernels import mask_loss

MASK_LOSS_WEIGHT = 6.0  # lambda in the paper


class AIMLossParts(NamedTuple):
    total: object
    classification: object
    mask: object


class AIMLoss(nn.Module):
    """total = cross-entropy of the final classifier + stage_weight * those of the stage
    classifiers + mask_weight * the mask term (differentiable through the straight-through masks).

    ``per_image_mask_loss`` (default): the mask term is the sum over stages of the mean over
    images of (r_l,i - tau)^2, r_l,i the active fraction of image i's stage-l mask, so every
    image keeps about tau of its positions. False: the paper's term, ``aim_kernels.mask_loss``,
    the sum over stages of (r_l - tau)^2 with r_l the fraction over the whole batch; it lets mask
    size vary with the class or background at no cost, and the masks then encode the class in
    their area (docs/masks_and_audit.md).
    """

    def __init__(self, mask_weight=MASK_LOSS_WEIGHT, stage_weight=1.0, per_image_mask_loss=True):
        super().__init__()
        for name, value in (("mask_weight", mask_weight), ("stage_weight", stage_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.mask_weight, self.stage_weight = float(mask_weight), float(stage_weight)
        self.per_image_mask_loss = bool(per_image_mask_loss)

    def forward(self, output, labels, tau):
        """output: an :class:`aim.AIMOutput`; labels: (N,) class indices; tau: the current target
        fraction, one number for every stage (e.g. from :class:`MaskAnnealing`) or one per stage,
        finest first."""
        classification = F.cross_entropy(output.logits, labels)
        for stage_logits in output.stage_logits.values():
            classification = classification + self.stage_weight * F.cross_entropy(stage_logits, labels)
        masks = list(output.masks.values())
        mask = per_image_mask_loss(masks, tau) if self.per_image_mask_loss else mask_loss(masks, tau)
        return AIMLossParts(classification + self.mask_weight * mask, classification, mask)


def per_image_mask_loss(masks, tau):
    """sum over stages l of mean over images i of (r_l,i - tau_l)^2, r_l,i the active fraction of
    image i's (N, 1, H, W) mask; tau one number for every stage or one per stage."""
    taus = list(tau) if isinstance(tau, (list, tuple)) else [tau] * len(masks)
    if len(taus) != len(masks):
        raise ValueError(f"tau has {len(taus)} entries but there are {len(masks)} mask stages")
    return sum(((m.flatten(1).float().mean(dim=1) - t) ** 2).mean() for m, t in zip(masks, taus))


class MaskAnnealing:
    """tau for an epoch: ``start`` (1.0, fully active) for ``warmup_epochs``, then linear to
    ``target`` over ``anneal_epochs``, then held. Fractional epochs (e.g. per step) interpolate too."""

    def __init__(self, target, anneal_epochs, start=1.0, warmup_epochs=0):
        if not 0 < target <= 1 or not 0 < start <= 1:
            raise ValueError(f"target and start must be fractions in (0, 1], got target={target}, start={start}")
        if anneal_epochs < 0 or warmup_epochs < 0:
            raise ValueError(f"anneal_epochs and warmup_epochs must be >= 0, got {anneal_epochs} and {warmup_epochs}")
        self.target, self.anneal_epochs, self.start = float(target), anneal_epochs, float(start)
        self.warmup_epochs = warmup_epochs

    @classmethod
    def for_model(cls, model, anneal_epochs, start=1.0):
        """The schedule towards the target an :class:`aim.AIM` or :class:`aim.FusedTopDownMask` was built with."""
        return cls(model.target, anneal_epochs, start)

    def __call__(self, epoch):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch < self.warmup_epochs:
            return self.start
        epoch = epoch - self.warmup_epochs
        if self.anneal_epochs == 0 or epoch >= self.anneal_epochs:
            return self.target
        return self.start + (self.target - self.start) * epoch / self.anneal_epochs
