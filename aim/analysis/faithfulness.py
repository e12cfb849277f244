"""Explanation quality beyond the Energy Pointing Game, for any model of ``aim`` and two maps:
the decision map of the exact audit (:mod:`aim.analysis.audit`) and GradCAM (Captum).

- :func:`deletion_insertion`: the deletion and insertion games of RISE (Petsiuk et al., BMVC
  2018, eclique/RISE ``evaluation.py``): pixels are removed (set to 0 in the model's input
  space) or inserted (into a blurred copy) most salient first, and the probability of the
  explained class is read after each step; the areas under the two curves, over the fraction
  of pixels in [0, 1], are the scores (deletion: lower is better, insertion: higher).
- :func:`grid_pointing_game`: the grid pointing game of B-cos (Boehle et al., CVPR 2022):
  images of different classes side by side in one input, each cell's class explained, and the
  share of the positive attribution that falls in that cell is the score (1 / cells: chance).

Neither Captum nor pytorch-grad-cam has these games; Quantus' PixelFlipping is the deletion
curve only (docs/report.md says why it is not used and how ours was checked against it).
"""
import torch
import torch.nn.functional as F

from aim.analysis import audit
from aim.analysis.attribution import gradcam
from aim.nn.model import logits_of

# RISE's insertion substrate: a Gaussian blur of kernel 11, sigma 5.
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


def decision_map(model, images, targets):
    """(N, H, W) the audit's per-pixel contributions to the margin of ``targets`` over each
    target's strongest other class (signed; with the bias they sum to that margin)."""
    decision = audit.decision_contributions(model, images, targets=targets)
    return audit.contributions_at(decision["contributions"], tuple(images.shape[-2:])).float()


def gradcam_map(model, images, targets):
    """(N, H, W) GradCAM of ``targets`` on the backbone's last stage, bilinear to the image."""
    cam = gradcam(model, images, targets)
    return F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


ATTRIBUTIONS = {"decision map": decision_map, "GradCAM": gradcam_map}


def saliency_ranks(saliency, seed=0):
    """(N, H*W) rank of every pixel, 0 the most salient. Ties (AIM's maps are 0 off the mask and
    constant over each cell's footprint) are broken in one seeded random order, not top-left first."""
    n = saliency.shape[0]
    flat = saliency.reshape(n, -1).float()
    shuffle = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(seed)).to(flat.device)
    order = shuffle[torch.argsort(flat[:, shuffle], dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand(n, -1).contiguous())
    return ranks


@torch.no_grad()
def deletion_insertion(model, images, saliency, targets, steps=16, seed=0):
    """The deletion and insertion curves of ``images`` (N, 3, H, W) under ``saliency`` (N, H, W)
    for the classes ``targets`` (N,). Returns {"fractions": (steps + 1,) pixels changed,
    "deletion", "insertion": (N, steps + 1) probability of the target, "deletion_auc",
    "insertion_auc": (N,) trapezoidal areas over the fractions}."""
    n, _, height, width = images.shape
    ranks = saliency_ranks(saliency, seed).view(n, 1, height, width)
    blurred = _blur(images)
    fractions = torch.linspace(0, 1, steps + 1)
    curves = {"deletion": [], "insertion": []}
    rows = torch.arange(n)
    for fraction in fractions.tolist():
        changed = ranks < round(fraction * height * width)
        batch = torch.cat([torch.where(changed, torch.zeros_like(images), images), torch.where(changed, images, blurred)])
        probabilities = logits_of(model(batch)).float().softmax(1).cpu()
        curves["deletion"].append(probabilities[:n][rows, targets.cpu()])
        curves["insertion"].append(probabilities[n:][rows, targets.cpu()])
    result = {"fractions": fractions}
    for name, values in curves.items():
        result[name] = torch.stack(values, dim=1)
        result[f"{name}_auc"] = torch.trapezoid(result[name], fractions, dim=1)
    return result


def _blur(images):
    from torchvision.transforms.v2.functional import gaussian_blur

    return gaussian_blur(images, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])


def grid_layout(num_classes):
    """(rows, columns) of a grid: 2 x 2 with four classes or more (B-cos uses 3 x 3 of
    ImageNet's), else one row of one image per class (cells of one class would share the credit)."""
    if num_classes < 2:
        raise ValueError("the grid pointing game needs images of at least two classes")
    return (2, 2) if num_classes >= 4 else (1, num_classes)


def grid_candidates(probabilities, labels):
    """Indices of the correctly classified images (``probabilities`` (N, K) of the model), most
    confident first: B-cos builds its grids from confidently classified images, so that a wrong
    cell does not blur the score."""
    confidence = probabilities[torch.arange(len(labels)), labels]
    correct = probabilities.argmax(1) == labels
    order = torch.argsort(confidence, descending=True, stable=True)
    return order[correct[order]]


def make_grids(images, labels, candidates, num_classes, max_grids):
    """(grids (G, 3, rows*H, cols*W), targets (G, cells)): cell k of grid j holds the j-th
    candidate of class (j + k) mod K, so every grid has distinct classes and every class
    visits every cell. Stops when a class has no candidate left."""
    rows, columns = grid_layout(num_classes)
    cells = rows * columns
    queues = {c: [int(i) for i in candidates if labels[i] == c] for c in range(num_classes)}
    grids, targets = [], []
    for j in range(max_grids):
        classes = [(j + k) % num_classes for k in range(cells)]
        if any(not queues[c] for c in classes):
            break
        tiles = [images[queues[c].pop(0)] for c in classes]
        grids.append(torch.cat([torch.cat(tiles[r * columns:(r + 1) * columns], dim=2) for r in range(rows)], dim=1))
        targets.append(classes)
    if not grids:
        return None, None
    return torch.stack(grids), torch.tensor(targets)


def grid_pointing_game(model, grids, targets, attribute, layout, batch_size=64):
    """Per grid and cell (G, cells): the share of the positive attribution of the cell's class
    that falls inside that cell, 0 where the map has no positive energy. ``attribute(model,
    images, targets)`` -> (N, H, W), e.g. an entry of :data:`ATTRIBUTIONS`; ``layout`` the
    grids' (rows, columns)."""
    count, cells = targets.shape
    rows, columns = layout
    height, width = grids.shape[-2] // rows, grids.shape[-1] // columns
    repeated, explained = grids.repeat_interleave(cells, dim=0), targets.flatten().to(grids.device)
    maps = [attribute(model, repeated[s:s + batch_size], explained[s:s + batch_size]) for s in range(0, len(repeated), batch_size)]
    energy = torch.cat(maps).clamp_min(0).view(count, cells, rows, height, columns, width)
    by_cell = energy.sum(dim=(3, 5)).flatten(2)  # (G, cells explained, cells of the grid)
    total = by_cell.sum(2)
    inside = by_cell.diagonal(dim1=1, dim2=2)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))
