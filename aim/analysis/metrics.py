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


def energy_pointing_game(attribution, foreground, mode="nearest"):
    """Per image, the fraction of the non-negative attribution energy that falls inside the
    ground-truth foreground (Score-CAM's energy-based pointing game).

    attribution: (N, 1, h, w) map (a binary mask, a GradCAM map), upsampled to the foreground's
    (H, W) with ``mode`` ("nearest" for masks, as the top-down pathway applies them; "bilinear"
    for GradCAM); foreground: (N, H, W) or (N, 1, H, W), nonzero inside. An image whose map has
    no energy points nowhere and scores 0. Average over the images that have a foreground
    (``foreground.flatten(1).any(1)``).
    """
    foreground = foreground.reshape(foreground.shape[0], *foreground.shape[-2:]).to(attribution.device) != 0
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    energy = F.interpolate(attribution.detach().float(), size=foreground.shape[-2:], mode=mode, **kwargs)[:, 0].clamp_min(0)
    total = energy.flatten(1).sum(dim=1)
    inside = (energy * foreground).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def boxes_to_foreground(boxes, image_size):
    """(N, H, W) uint8 foregrounds from (N, 4) boxes x0, y0, x1, y1 in pixels, end exclusive."""
    height, width = image_size
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    b = boxes.view(-1, 4, 1, 1)
    return ((xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])).to(torch.uint8)


def box_area_fraction(boxes, image_size):
    """Fraction of the image each box covers: the pointing-game score of a uniform mask."""
    height, width = image_size
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / (height * width)
