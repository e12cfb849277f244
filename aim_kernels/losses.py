"""The AIM mask loss: per top-down stage, L = (r - tau)^2 with r the fraction of active
mask entries; the stages' losses are summed (the paper weights the sum by lambda = 6 in
the total loss, which is the caller's business)."""
from typing import Sequence, Union

import torch
from torch import Tensor


def mask_loss(masks: Union[Tensor, Sequence[Tensor]], targets: Union[float, Sequence[float]]) -> Tensor:
    """Sum over stages of ``(masks[l].mean() - targets[l]) ** 2``.

    Args:
        masks: one mask tensor or a sequence of them (one per stage), values in [0, 1]
            (the straight-through output of gumbel_binarize, so r carries its gradient).
            r is the fraction over all of a stage's entries (batch included).
        targets: the target fraction tau per stage: one number used for every stage, or a
            sequence as long as masks, each in [0, 1].

    Returns:
        0-d tensor in the masks' dtype, differentiable in the masks.
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    masks = list(masks)
    if not masks:
        raise ValueError("masks must contain at least one mask tensor")
    for i, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or not m.is_floating_point():
            raise TypeError(f"masks[{i}] must be a floating-point tensor")
        if m.numel() == 0:
            raise ValueError(f"masks[{i}] is empty: its active fraction is undefined")
    if isinstance(targets, (int, float)) and not isinstance(targets, bool):
        targets = [targets] * len(masks)
    targets = list(targets)
    if len(targets) != len(masks):
        raise ValueError(f"targets has {len(targets)} entries but there are {len(masks)} masks")
    for i, tau in enumerate(targets):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
            raise ValueError(f"targets[{i}] must be a number in [0, 1], got {tau!r}")
    return sum((m.mean() - tau) ** 2 for m, tau in zip(masks, targets))
