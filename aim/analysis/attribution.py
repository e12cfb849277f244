"""GradCAM, the attribution every model kind is compared by (AIM and the baseline alike)."""
import torch

from aim.nn.model import logits_of


def gradcam(model, images, targets):
    """GradCAM of ``targets`` (N,) on the last stage of ``model.backbone``, (N, 1, h, w), ReLU
    applied (captum.attr.LayerGradCam)."""
    from captum.attr import LayerGradCam

    cam = LayerGradCam(lambda x: logits_of(model(x)), model.backbone.last_stage)
    with torch.enable_grad():
        return cam.attribute(images, target=targets, relu_attributions=True).detach()
