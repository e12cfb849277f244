"""A procedurally generated WaterBirds-like toy task (no downloads).

Each image shows one object on a background. The class is the object's shape (0: disk,
1: plus sign); the background is "land" (green-brown blotches) or "water" (blue horizontal
waves). In the training split the background agrees with the class with probability
``spurious_correlation`` (0.95 like WaterBirds), so the background is a shortcut; in the test
split background and class are independent, and accuracy is reported per (class, background)
group -- the worst group shows whether a model relied on the shortcut. Every image carries its
object's bounding box, for pointing-game metrics on the masks.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

CLASS_NAMES = ("disk", "plus")
BACKGROUND_NAMES = ("land", "water")


class ToySplit(NamedTuple):
    images: torch.Tensor      # (N, 3, S, S) float32 in [0, 1]
    labels: torch.Tensor      # (N,) int64 class (object shape)
    backgrounds: torch.Tensor  # (N,) int64 0 land, 1 water
    boxes: torch.Tensor       # (N, 4) int64 object box x0, y0, x1, y1 (pixels, end exclusive)

    @property
    def groups(self):
        """Group index 2 * label + background: 0 disk/land, 1 disk/water, 2 plus/land, 3 plus/water."""
        return 2 * self.labels + self.backgrounds

    def __len__(self):
        return self.labels.shape[0]

    def as_dataset(self):
        """The split for the training loop and evaluation, object boxes as foregrounds."""
        from aim.data.common import TensorDataset
        from aim.analysis.metrics import boxes_to_foreground

        group_names = [f"{c}/{b}" for c in CLASS_NAMES for b in BACKGROUND_NAMES]
        foregrounds = boxes_to_foreground(self.boxes, tuple(self.images.shape[-2:])).unsqueeze(1)
        return TensorDataset(self.images, self.labels, self.groups, CLASS_NAMES, group_names, foregrounds)


def make_toy_split(num_images, image_size=64, spurious_correlation=0.95, seed=0):
    """Generate a split; ``spurious_correlation`` is P(background == label) (0.5: independent)."""
    if not 0 <= spurious_correlation <= 1:
        raise ValueError(f"spurious_correlation must be a probability, got {spurious_correlation}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for the shapes to be recognizable, got {image_size}")
    g = torch.Generator().manual_seed(seed)
    n, s = num_images, image_size
    labels = torch.randint(0, 2, (n,), generator=g)
    agrees = torch.rand(n, generator=g) < spurious_correlation
    backgrounds = torch.where(agrees, labels, 1 - labels)

    ys = torch.arange(s, dtype=torch.float32).view(1, s, 1)
    xs = torch.arange(s, dtype=torch.float32).view(1, 1, s)
    images = _backgrounds(backgrounds, s, g, ys, xs)

    # Object: side 22-34% of the image, anywhere fully inside it, in a random saturated colour
    # independent of class and background.
    side = torch.randint(int(0.22 * s), int(0.34 * s) + 1, (n,), generator=g)
    x0 = (torch.rand(n, generator=g) * (s - side + 1).float()).long()
    y0 = (torch.rand(n, generator=g) * (s - side + 1).float()).long()
    half = side.float().view(n, 1, 1) / 2
    cy, cx = y0.float().view(n, 1, 1) + half - 0.5, x0.float().view(n, 1, 1) + half - 0.5
    dy, dx = (ys - cy).abs(), (xs - cx).abs()
    disk = (dy ** 2 + dx ** 2) <= half ** 2
    arm = half / 3
    plus = ((dy <= arm) & (dx <= half)) | ((dx <= arm) & (dy <= half))
    shape = torch.where(labels.view(n, 1, 1) == 0, disk, plus).unsqueeze(1)
    hue = torch.rand(n, generator=g) * 2 * math.pi
    colour = 0.5 + 0.45 * torch.stack([torch.cos(hue), torch.cos(hue - 2.094), torch.cos(hue + 2.094)], dim=1)
    images = torch.where(shape, colour.view(n, 3, 1, 1), images)

    images = (images + 0.04 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1)
    return ToySplit(images, labels, backgrounds, boxes)


def _backgrounds(backgrounds, s, g, ys, xs):
    n = backgrounds.shape[0]
    # Land: green-brown mix driven by smooth blotches (low-resolution noise, upsampled).
    blotch = F.interpolate(torch.rand(n, 1, 6, 6, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    green, brown = torch.tensor([0.25, 0.45, 0.15]), torch.tensor([0.45, 0.35, 0.2])
    land = green.view(1, 3, 1, 1) * blotch + brown.view(1, 3, 1, 1) * (1 - blotch)
    # Water: blue with horizontal waves of random phase and frequency.
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    freq = 0.3 + 0.3 * torch.rand(n, 1, 1, generator=g)
    wave = 0.5 + 0.5 * torch.sin(freq * ys + 0.15 * torch.sin(0.2 * xs) + phase)
    water = torch.tensor([0.1, 0.3, 0.6]).view(1, 3, 1, 1) + torch.tensor([0.1, 0.15, 0.2]).view(1, 3, 1, 1) * wave.unsqueeze(1)
    brightness = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    return torch.where(backgrounds.view(n, 1, 1, 1) == 1, water, land) * brightness


def batches(split, batch_size, shuffle, generator=None):
    """Yield (images, labels, index) mini-batches of a split."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        yield split.images[index], split.labels[index], index


def save_waterbirds_layout(root, splits, image_format="jpg", class_names=CLASS_NAMES, foregrounds=None, place_names=None):
    """Write generated splits ({"train": ToySplit, "val": ..., "test": ...}) in the WaterBirds
    layout: images/<class>/<split>_<i>.<format>, metadata.csv (img_id, img_filename, y, split,
    place) and segmentations/<img_filename>.png holding each object's box as its foreground.
    Returns the metadata rows.

    class_names: the folder of each class under images/. foregrounds: {split: (N, H, W) uint8
    tensor, nonzero on the object} written as the segmentations instead of the boxes (an
    object's own silhouette, e.g. aim.data.photos). place_names: also write the columns
    class_name and place_name, which aim.data.waterbirds reads as the names."""
    import csv
    import os

    from PIL import Image

    from aim.data.waterbirds import SPLITS
    from aim.analysis.metrics import boxes_to_foreground

    rows = []
    for split, data in splits.items():
        if foregrounds is None:
            masks = boxes_to_foreground(data.boxes, tuple(data.images.shape[-2:]))
        else:
            masks = (foregrounds[split] > 0).to(torch.uint8)
        for i in range(len(data)):
            name = f"images/{class_names[int(data.labels[i])]}/{split}_{i:05d}.{image_format}"
            for folder in (root, os.path.join(root, "segmentations")):
                os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
            _to_pil(data.images[i]).save(os.path.join(root, name))
            Image.fromarray((masks[i] * 255).numpy()).save(os.path.join(root, "segmentations", name.rsplit(".", 1)[0] + ".png"))
            rows.append({"img_id": len(rows) + 1, "img_filename": name, "y": int(data.labels[i]), "split": SPLITS[split],
                         "place": int(data.backgrounds[i])})
            if place_names is not None:
                rows[-1].update(class_name=class_names[rows[-1]["y"]], place_name=place_names[rows[-1]["place"]])
            for column, values in (("shape", getattr(data, "shapes", ())), ("scene", getattr(data, "scenes", ()))):
                if values:  # the embedded generator's sub-shape and scene family of each image
                    rows[-1][column] = values[i]
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def save_folder_layout(root, splits, image_format="png"):
    """Write generated splits in the class-per-folder layout: <split>/<class>/<i>.<format>."""
    import os

    for split, data in splits.items():
        for i in range(len(data)):
            folder = os.path.join(root, split, CLASS_NAMES[int(data.labels[i])])
            os.makedirs(folder, exist_ok=True)
            _to_pil(data.images[i]).save(os.path.join(folder, f"{i:05d}.{image_format}"))


def _to_pil(image):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
