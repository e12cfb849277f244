"""Parameters and FLOPs AIM adds over the plain torchvision classifier."""
import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model, images):
    """FLOPs of one eval-mode forward as counted by torch.utils.flop_counter (2 per multiply-add;
    convolutions, matmuls and the like -- elementwise ops, including the fused aim_kernels ops,
    are not counted)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def added_cost(backbone, depth=2, image_size=224, num_classes=2, **aim_kwargs):
    """Parameters and FLOPs of ``AIM(backbone, ...)`` against the plain torchvision classifier of
    the same name and number of classes, for one image_size x image_size image."""
    import torchvision

    from aim.model import AIM

    model = AIM(backbone, num_classes=num_classes, depth=depth, **aim_kwargs)
    plain = torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)
    images = torch.randn(1, 3, image_size, image_size)
    aim_params = sum(p.numel() for p in model.parameters())
    plain_params = sum(p.numel() for p in plain.parameters())
    aim_flops, plain_flops = count_flops(model, images), count_flops(plain, images)
    return {"aim_params": aim_params, "plain_params": plain_params, "added_params": aim_params - plain_params,
            "aim_flops": aim_flops, "plain_flops": plain_flops, "added_flops": aim_flops - plain_flops}
