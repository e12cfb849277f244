"""Mask visualisation: images next to their masks, object boxes outlined."""
import torch
import torch.nn.functional as F


def mask_overlay_grid(images, masks, boxes):
    """(3, H', W') grid image: per row one image, then one overlay per mask (the image dimmed
    where the nearest-upsampled mask is 0), with the object box outlined in red."""
    n, _, height, width = images.shape
    columns = [images]
    for mask in masks:
        keep = F.interpolate(mask.detach().float(), size=(height, width), mode="nearest")
        columns.append(images * (0.2 + 0.8 * keep))
    rows = torch.stack(columns, dim=1).clone()  # (N, 1 + len(masks), 3, H, W)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1)
    for i in range(n):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        rows[i, :, :, y0, x0:x1] = red
        rows[i, :, :, y1 - 1, x0:x1] = red
        rows[i, :, :, y0:y1, x0] = red.view(1, 3, 1)
        rows[i, :, :, y0:y1, x1 - 1] = red.view(1, 3, 1)
    import torchvision

    return torchvision.utils.make_grid(rows.flatten(0, 1), nrow=1 + len(masks), padding=2, pad_value=1.0)


def save_mask_overlay(images, masks, boxes, path):
    """Write :func:`mask_overlay_grid` to a PNG file."""
    import torchvision

    torchvision.utils.save_image(mask_overlay_grid(images, masks, boxes), path)


def save_curves(history, path):
    """curves.png: loss, accuracies and mask active fractions per epoch of a training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [row["loss"] for row in history], marker="o")
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train")
    axes[1].plot(epochs, [row["val"]["accuracy"] for row in history], marker="o", label="val")
    if history[-1]["val"]["worst_group_accuracy"] is not None:
        axes[1].plot(epochs, [row["val"]["worst_group_accuracy"] for row in history], marker="o", label="val worst group")
    axes[1].set_title("accuracy")
    axes[1].legend()
    if history[-1]["mask_active_fraction"]:
        for stage in history[-1]["mask_active_fraction"]:
            axes[2].plot(epochs, [row["mask_active_fraction"][stage] for row in history], marker="o", label=f"stage {stage}")
        axes[2].plot(epochs, [row["tau"] for row in history], linestyle="--", color="gray", label="tau")
        axes[2].legend()
    axes[2].set_title("mask active fraction (train)")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
