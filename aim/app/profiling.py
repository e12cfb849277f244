"""Parameters and FLOPs AIM adds over the plain classifier (torchvision's or timm's)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from aim.nn.timm_backbones import create_timm_classifier, is_timm_name


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


def plain_classifier(name, num_classes, image_size=224):
    """The classifier a backbone name stands for, randomly initialized: torchvision's, or timm's
    for ``timm:NAME`` (built for ``image_size`` if bound to one input size)."""
    if is_timm_name(name):
        return create_timm_classifier(name.removeprefix("timm:"), image_size=image_size, num_classes=num_classes)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def added_cost(backbone, depth=2, image_size=224, num_classes=2, **aim_kwargs):
    """Parameters and FLOPs of ``AIM(backbone, ...)`` against :func:`plain_classifier` of the same
    name and number of classes, for one image_size x image_size image."""
    from aim.nn.backbones import build_backbone
    from aim.nn.model import AIM

    # image_size: a timm ViT or Swin is built for it
    model = AIM(build_backbone(backbone, stages_used=depth, image_size=image_size), num_classes=num_classes, depth=depth,
                **aim_kwargs)
    plain = plain_classifier(backbone, num_classes, image_size)
    images = torch.randn(1, 3, image_size, image_size)
    aim_params = sum(p.numel() for p in model.parameters())
    plain_params = sum(p.numel() for p in plain.parameters())
    aim_flops, plain_flops = count_flops(model, images), count_flops(plain, images)
    return {"aim_params": aim_params, "plain_params": plain_params, "added_params": aim_params - plain_params,
            "aim_flops": aim_flops, "plain_flops": plain_flops, "added_flops": aim_flops - plain_flops}


def command_profile(args):
    """``aim profile``: print what :func:`added_cost` measures."""
    cost = added_cost(args.backbone, depth=args.depth, image_size=args.image_size, num_classes=args.num_classes)
    print(f"AIM[{args.depth}] on {args.backbone} at {args.image_size}x{args.image_size}, {args.num_classes} classes")
    print(f"  parameters: plain {cost['plain_params'] / 1e6:.2f} M, AIM {cost['aim_params'] / 1e6:.2f} M, added {cost['added_params'] / 1e6:.2f} M")
    print(f"  FLOPs (torch.utils.flop_counter, 2 per multiply-add): plain {cost['plain_flops'] / 1e9:.2f} G, "
          f"AIM {cost['aim_flops'] / 1e9:.2f} G, added {cost['added_flops'] / 1e9:.3f} G "
          f"(= {cost['added_flops'] / 2e9:.3f} G multiply-adds, the convention of the paper's 4.5 G for ConvNeXt-T)")
