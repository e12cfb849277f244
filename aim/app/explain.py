"""``aim explain``: for each image, a PNG with the image, each top-down stage's binary mask
overlaid, the exact decision map (aim.analysis.audit: each pixel's share of the logit margin of the
predicted class over the runner-up; the map plus the bias term sums to the margin), GradCAM
(Captum, last backbone stage) for comparison, and the predicted class with its probability."""
import os

import torch
import torch.nn.functional as F

from aim.analysis import audit
from aim.analysis.attribution import gradcam
from aim.nn.model import logits_of
from aim.nn.model import AIMOutput


def explain_image(model, image, class_names):
    """Prediction, masks, decision map and GradCAM of one normalized (3, S, S) image, maps at
    image size. "decision" (S, S) sums with "bias" to "margin", the logit of the predicted class
    minus that of "runner_up" (None, like the map, for a one-class head)."""
    batch = image.unsqueeze(0)
    with torch.no_grad():
        output = model(batch)
    probabilities = logits_of(output).float().softmax(1)[0]
    predicted = int(probabilities.argmax())
    size = tuple(image.shape[-2:])
    masks = {}
    if isinstance(output, AIMOutput):
        masks = {name: F.interpolate(m.float(), size=size, mode="nearest")[0, 0] for name, m in output.masks.items()}
    cam = gradcam(model, batch, torch.tensor([predicted], device=batch.device))
    cam = F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    cam = cam / cam.max() if cam.max() > 0 else cam
    explanation = {"class": class_names[predicted], "probability": probabilities[predicted].item(), "masks": masks,
                   "gradcam": cam, "decision": None, "runner_up": None, "margin": None, "bias": None}
    if len(class_names) >= 2:
        decision = audit.decision_contributions(model, batch.float())
        explanation.update(decision=audit.contributions_at(decision["contributions"], size)[0],
                           runner_up=class_names[int(decision["runner_up"][0])],
                           margin=decision["margin"][0].item(), bias=decision["bias"][0].item())
    return explanation


def save_explanation(image, explanation, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = image.permute(1, 2, 0).cpu().numpy()
    decision = explanation["decision"]
    panels = 2 + len(explanation["masks"]) + (decision is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.9))
    axes[0].imshow(picture)
    axes[0].set_title("image")
    for ax, (name, mask) in zip(axes[1:], explanation["masks"].items()):
        keep = mask.cpu().numpy()[..., None]
        ax.imshow(picture * (0.2 + 0.8 * keep))  # dropped positions dimmed
        ax.set_title(f"mask, stage {name}\n{mask.mean().item():.0%} active", fontsize=9)
    if decision is not None:
        ax = axes[1 + len(explanation["masks"])]
        values = decision.cpu().numpy()
        limit = max(abs(values).max(), 1e-12)
        ax.imshow(picture.mean(axis=2), cmap="gray", alpha=0.35)
        ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.85)  # red: for the prediction
        ax.set_title(f"decision vs {explanation['runner_up']}\nmargin {explanation['margin']:.2f} = "
                     f"map {values.sum():.2f} + bias {explanation['bias']:.2f}", fontsize=8)
    axes[-1].imshow(picture)
    axes[-1].imshow(explanation["gradcam"].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[-1].set_title("GradCAM (Captum)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def command_explain(args):
    from aim.data import DataError
    from aim.data.common import UNREADABLE
    from aim.errors import first_line
    from aim.data.transforms import denormalize, load_image, transform_for
    from aim.config import check_device
    from aim.checkpoint import read_checkpoint, model_from_checkpoint

    check_device(args.device)
    checkpoint = read_checkpoint(args.checkpoint, f"checkpoint {args.checkpoint}")
    preprocessing = checkpoint["config"].get("preprocessing", "imagenet")
    transform = transform_for(preprocessing, checkpoint["config"]["image_size"])
    images = []
    for path in args.images:  # every image read before anything is written
        try:
            images.append(transform(load_image(path)))
        except UNREADABLE as error:
            raise DataError(f"{path}: cannot be read as an image ({first_line(error)})") from None
        size = checkpoint["config"]["image_size"]
        if preprocessing == "raw" and tuple(images[-1].shape[-2:]) != (size, size):
            raise DataError(f"{path}: the image is {images[-1].shape[-1]}x{images[-1].shape[-2]}; the model was trained with "
                            f"preprocessing 'raw', which uses images as they are, at {size}x{size}")
    model = model_from_checkpoint(checkpoint, args.device)
    os.makedirs(args.out, exist_ok=True)
    used = set()
    for path, image in zip(args.images, images):
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = stem, 1
        while name in used:  # the same file name from two folders
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        explanation = explain_image(model, image.to(args.device), checkpoint["class_names"])
        out = os.path.join(args.out, name + ".png")
        title = f"{os.path.basename(path)}: {explanation['class']} ({explanation['probability']:.0%})"
        shown = image if preprocessing == "raw" else denormalize(image.unsqueeze(0))[0]
        save_explanation(shown, explanation, out, title)
        print(f"{path}: {explanation['class']} {explanation['probability']:.3f} -> {out}")
