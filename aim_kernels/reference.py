"""Plain-PyTorch reference of every op: the test oracle and the fallback path.

Written for clarity, not speed. Each function states the op's exact semantics.
"""
import torch
import torch.nn.functional as F


def topdown_merge(feat, mask, prev=None):
    """feat * mask + nearest-upsample(prev) to feat's spatial size (F.interpolate's index rule)."""
    out = feat * mask
    if prev is not None and out.numel() > 0:  # F.interpolate rejects empty tensors
        out = out + F.interpolate(prev, size=feat.shape[-2:], mode="nearest")
    return out


def topdown_merge_backward(grad_out, feat, mask, prev_size):
    """Gradients of topdown_merge by autograd of the forward above.

    prev_size is [h, w] of prev, or [] when there was none (grad_prev is then empty)."""
    with torch.enable_grad():
        feat_ = feat.detach().requires_grad_()
        mask_ = mask.detach().requires_grad_()
        inputs = [feat_, mask_]
        prev_ = None
        if len(prev_size) == 2:
            prev_ = feat.new_zeros(feat.shape[0], feat.shape[1], *prev_size).requires_grad_()
            inputs.append(prev_)
        grads = torch.autograd.grad(topdown_merge(feat_, mask_, prev_), inputs, grad_out)
    grad_prev = grads[2] if prev_ is not None else feat.new_empty(0)
    return grads[0], grads[1], grad_prev
