"""What a classifier's decisions rest on, for AIM and the baseline alike (docs/audit.md):

- :func:`mask_area_leak`: can the *size* of AIM's masks tell the class or the background? Per
  stage: the share of images whose eval mask is empty, the mean active fraction per class and
  per group, and the ROC AUC of the active fraction as a predictor of the class and of the
  background. An honest mask has AUCs near 0.5 on a task where the object's size does not
  depend on the class.
- :func:`decision_contributions`: the exact decomposition of the logit margin (predicted
  class over the runner-up) of a global-average-pooled linear head into one contribution per
  position of the pooled map plus a bias term (the CAM identity):

      margin = (w_y - w_r) . mean_p F_p + (b_y - b_r) = sum_p c_p + bias,
      c_p = (w_y - w_r) . F_p / |P|

  (|P| the positions the head averages over: all of them, or AIM's active ones with
  pooling="active").
  For AIM, F is the fused map F_depth, so c_p is exactly 0 wherever every stage's upsampled
  mask is 0. :func:`decision_shares` splits sum_p c_p into object and background with the
  ground-truth foreground: "decision on the object".
"""
import torch
import torch.nn.functional as F

from aim.nn.model import AIM

SHARE_NAMES = ("object", "background", "bias")


def roc_auc(scores, positives):
    """ROC AUC of ``scores`` (N,) for the boolean ``positives`` (N,): the probability that a
    positive scores above a negative, ties counted one half (Mann-Whitney U / (n_pos n_neg)).
    None when one side is empty."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positives = torch.as_tensor(positives).flatten().bool()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Average ranks (1-based) with ties sharing the mean rank of their block.
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    u = ranks[positives].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _most_predictive_auc(scores, targets, num_values):
    """The AUC of ``scores`` for ``targets == 1`` with two values; with more, the one-vs-rest
    AUC farthest from 0.5 (the value the scores tell best)."""
    if num_values == 2:
        return roc_auc(scores, targets == 1)
    aucs = [a for a in (roc_auc(scores, targets == v) for v in range(num_values)) if a is not None]
    return max(aucs, key=lambda a: abs(a - 0.5)) if aucs else None


def means_by(values, index, count):
    """Mean of ``values`` per index value 0..count-1 (None where there is none)."""
    out = []
    for k in range(count):
        members = index == k
        out.append(values[members].mean().item() if members.any() else None)
    return out


def mask_area_leak(fractions, labels, groups, num_classes, num_groups=None):
    """The mask-area leak report. fractions: {stage: (N,) per-image active fraction of the
    eval mask}; labels, groups: (N,) int64; groups = places_per_class * label + background
    (WaterBirds' 2 * y + place), or None without groups. Returns {stage: {...}} with
    empty_share, active_by_class, active_by_group (None without groups), auc_class and
    auc_background (None without groups)."""
    labels = torch.as_tensor(labels)
    backgrounds, places = None, None
    if groups is not None and num_groups is not None and num_groups % num_classes == 0 and num_groups > num_classes:
        places = num_groups // num_classes
        groups = torch.as_tensor(groups)
        backgrounds = groups - places * labels
    report = {}
    for stage, values in fractions.items():
        values = torch.as_tensor(values, dtype=torch.float64)
        report[stage] = {
            "empty_share": (values == 0).double().mean().item(),
            "active_by_class": means_by(values, labels, num_classes),
            "active_by_group": means_by(values, groups, num_groups) if backgrounds is not None else None,
            "auc_class": _most_predictive_auc(values, labels, num_classes),
            "auc_background": _most_predictive_auc(values, backgrounds, places) if backgrounds is not None else None,
        }
    return report


def pooled_map_and_head(model, images):
    """(F, divisor, linear head) of a model whose logits are ``head(F.sum((2, 3)) / divisor)``:
    AIM's fused map F_depth, its pooling's position count (N, 1) and its final classifier, or
    the baseline's last stage map, its area and fc."""
    from aim.nn.backbones import BaselineClassifier, as_stage_dict

    if isinstance(model, AIM):
        stages, masks = model.classifier_stages(images)
        result = model.topdown.run(stages, masks=masks)
        final = next(iter(result.features.values()))
        return final, model.topdown._pool_divisor(list(result.masks.values()), final.shape[-2:]), model.classifier
    if isinstance(model, BaselineClassifier):
        final = as_stage_dict(model.backbone(images)).popitem()[1]
        return final, final.new_full((final.shape[0], 1), float(final.shape[-2] * final.shape[-1])), model.fc
    raise TypeError(f"decision_contributions needs an aim.AIM or aim.nn.backbones.BaselineClassifier, got {type(model).__name__}")


@torch.no_grad()
def decision_contributions(model, images, targets=None):
    """The exact decision audit of a batch (model in eval mode): a dict of
    logits (N, K); predicted, runner_up (N,); margin (N,) = logit[predicted] - logit[runner_up];
    contributions (N, h, w) = c_p on the pooled map's grid; bias (N,) = b_y - b_r;
    so that contributions.sum((1, 2)) + bias == margin up to rounding.

    targets (N,): audit these classes instead of the predicted ones ("predicted" then holds the
    targets, "runner_up" each target's strongest other class), e.g. to explain every cell of a
    grid of images of different classes."""
    features, divisor, head = pooled_map_and_head(model, images)
    # At least float32 (AMP maps), float64 kept: the identity is then exact to that precision.
    dtype = torch.promote_types(features.dtype, torch.float32)
    features, divisor = features.to(dtype), divisor.to(dtype)
    logits = F.linear(features.sum(dim=(2, 3)) / divisor, head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype))
    if logits.shape[1] < 2:
        raise ValueError("the decision audit needs at least two classes")
    if targets is None:
        top2 = logits.topk(2, dim=1).indices
    else:
        targets = targets.to(logits.device).view(-1, 1)
        others = logits.scatter(1, targets, float("-inf"))
        top2 = torch.cat([targets, others.argmax(1, keepdim=True)], dim=1)
    predicted, runner_up = top2[:, 0], top2[:, 1]
    weight_difference = head.weight[predicted] - head.weight[runner_up]  # (N, C)
    contributions = torch.einsum("nc,nchw->nhw", weight_difference.to(dtype), features) / divisor[:, :, None]
    bias = (head.bias[predicted] - head.bias[runner_up]).to(dtype) if head.bias is not None else logits.new_zeros(predicted.shape)
    margin = logits.gather(1, top2[:, :1]).squeeze(1) - logits.gather(1, top2[:, 1:]).squeeze(1)
    return {"logits": logits, "predicted": predicted, "runner_up": runner_up, "margin": margin,
            "contributions": contributions, "bias": bias}


def contributions_at(contributions, size):
    """c_p spread evenly over the image pixels of p's nearest-upsampling footprint, (N, H, W):
    the per-pixel decision map, which sums to the same total (each cell's footprint is the set of
    pixels that ``F.interpolate(..., mode="nearest")`` maps to it)."""
    from aim.nn.topdown import footprint_counts

    h, w = contributions.shape[-2:]
    counts = footprint_counts((h, w), [size]).to(contributions.device, contributions.dtype)
    return F.interpolate((contributions / counts)[:, None], size=size, mode="nearest")[:, 0]


def decision_shares(audit, foreground):
    """Per image, the shares of the decision resting on the object, on the background and on
    the bias: with C_obj = sum over object pixels of the per-pixel decision map, C_bg the rest
    and C_bias the bias term (C_obj + C_bg + C_bias = margin, exactly), each share is
    C / (|C_obj| + |C_bg| + |C_bias|), in [-1, 1]; when all three are >= 0 they are the
    fractions of the margin. foreground: (N, 1, H, W) or (N, H, W), nonzero inside.
    Returns {"object", "background", "bias"}: (N,) float64."""
    foreground = foreground.reshape(foreground.shape[0], *foreground.shape[-2:]) != 0
    pixels = contributions_at(audit["contributions"].double(), tuple(foreground.shape[-2:]))
    on_object = (pixels * foreground.to(pixels.device)).flatten(1).sum(1)
    on_background = pixels.flatten(1).sum(1) - on_object
    bias = audit["bias"].double()
    total = on_object.abs() + on_background.abs() + bias.abs()
    safe = total.clamp_min(torch.finfo(torch.float64).tiny)
    zero = total == 0
    return {name: torch.where(zero, torch.zeros_like(value), value / safe)
            for name, value in zip(SHARE_NAMES, (on_object, on_background, bias))}
