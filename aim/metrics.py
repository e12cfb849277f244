"""Accuracy and mask statistics for AIM models."""
import torch
import torch.nn.functional as F


def accuracy(logits, labels):
    """Fraction of correct argmax predictions."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


def group_accuracies(predictions, labels, groups, num_groups):
    """Accuracy per group index (NaN for an empty group) and the worst group's accuracy."""
    correct = (predictions == labels).float()
    per_group = []
    for group in range(num_groups):
        members = groups == group
        per_group.append(correct[members].mean().item() if members.any() else float("nan"))
    present = [a for a in per_group if a == a]
    return per_group, min(present) if present else float("nan")


def mask_active_fraction(mask):
    """Per image, the fraction of active entries of a (N, 1, H, W) mask: r_l of the mask loss."""
    return mask.detach().flatten(1).float().mean(dim=1)


def energy_pointing_game(mask, boxes, image_size):
    """Per image, the fraction of mask energy that falls inside the object's box.

    The (N, 1, h, w) mask is upsampled to the (H, W) image with nearest (the same rule the
    top-down pathway uses), so each mask entry counts for the pixels it covers; boxes are
    (N, 4) x0, y0, x1, y1 in pixels, end exclusive. An image whose mask is empty points
    nowhere and scores 0.
    """
    energy = F.interpolate(mask.detach().float(), size=image_size, mode="nearest")[:, 0]
    height, width = image_size
    ys = torch.arange(height, device=energy.device).view(1, height, 1)
    xs = torch.arange(width, device=energy.device).view(1, 1, width)
    b = boxes.to(energy.device).view(-1, 4, 1, 1)
    inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
    total = energy.flatten(1).sum(dim=1)
    in_box = (energy * inside).flatten(1).sum(dim=1)
    return torch.where(total > 0, in_box / total.clamp_min(1e-12), torch.zeros_like(total))


def box_area_fraction(boxes, image_size):
    """Fraction of the image each box covers: the pointing-game score of a uniform mask."""
    height, width = image_size
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / (height * width)
