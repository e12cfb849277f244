"""Image decoding and the transforms.v2 pipelines of the two preprocessings a run records
(TrainConfig.preprocessing, applied again by ``aim eval`` / ``aim explain``):

- "imagenet", group_DRO's defaults: train RandomResizedCrop(S, scale=(0.7, 1)) + horizontal
  flip; eval resize to S*256/224 (square, as group_DRO does) then center-crop S; ImageNet
  normalization.
- "raw": the image as it is, S x S, values in [0, 1], no augmentation: what the embedded
  benchmark's generated tensors are, so a model trained on them (``aim demo``) and one trained on
  their PNG files (``aim data embedded``) see the same numbers."""
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from aim.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


PREPROCESSINGS = ("imagenet", "raw")


def transform_for(preprocessing, image_size, augment=False):
    """The pipeline of one of PREPROCESSINGS, for training (``augment``) or evaluation."""
    if preprocessing == "raw":
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])  # sizes: aim.data.open_split checks
    return train_transform(image_size) if augment else eval_transform(image_size)


def train_transform(image_size):
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), *_to_normalized_float()])


def eval_transform(image_size):
    resized = int(image_size * 256 / 224)
    return v2.Compose([v2.ToImage(), v2.Resize((resized, resized), antialias=True), v2.CenterCrop(image_size),
                       *_to_normalized_float()])


def _to_normalized_float():
    # ToDtype with one dtype converts images only: a tv_tensors.Mask passes through as is.
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def denormalize(images):
    """Normalized (N, 3, H, W) images back to [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def load_image(path, check=False):
    """An RGB PIL image; ``check`` decodes it at reduced size only (JPEG draft mode still reads
    the whole stream, so truncation is found) and returns its (width, height).

    16-bit grayscale images (PNG's I;16, PIL's I) keep their top 8 bits: PIL's convert("RGB")
    clips them at 255, which turns most such images white."""
    with Image.open(path) as image:
        if check:
            size = image.size
            image.draft("RGB", (64, 64))
            image.load()
            return size
        if image.mode.startswith("I;16") or image.mode == "I":
            return image.convert("I").point(lambda value: value / 256).convert("L").convert("RGB")
        return image.convert("RGB")


def load_foreground(path, size, check=False):
    """A foreground mask (any pixel > 0 is foreground) as a (1, H, W) uint8 tv_tensors.Mask;
    ``size`` (width, height) of the image it belongs to. A mask stored at another size of the
    same aspect ratio (within rounding) is resized to the image (nearest); one of another
    aspect ratio is a :class:`DataError` naming the mask, as stretching it would move the
    foreground. ``check`` decodes it and returns None."""
    with Image.open(path) as mask:
        if size is not None and mask.size != size:
            (mask_w, mask_h), (image_w, image_h) = mask.size, size
            if abs(mask_w * image_h - mask_h * image_w) > (image_w + image_h) / 2:
                raise DataError(f"{path}: the mask is {mask_w}x{mask_h}, its image {image_w}x{image_h}: another aspect "
                                f"ratio (a mask of the same aspect ratio would be resized to the image)")
        if check:
            mask.load()
            return None
        mask = mask.convert("L")
        if size is not None and mask.size != size:
            mask = mask.resize(size, Image.NEAREST)
        return tv_tensors.Mask((torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
                                .view(1, mask.size[1], mask.size[0]) > 0).to(torch.uint8))
