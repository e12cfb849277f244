"""The embedded spurious-correlation benchmark (no downloads): an unbiased pretraining set and a
biased two-class fine-tuning task built as WaterBirds is (CUB birds on Places scenes), the
CPU-sized analog of ImageNet pretraining + WaterBirds.

Every image is one object (a filled shape) pasted on a procedural scene; images are quantized
to 8 bits, so an image written as PNG reads back exactly.

- **Object:** its area is drawn uniformly from ``area_range`` (a fraction of the image)
  independently of the class -- each shape's box is scaled so the shape itself has that area --
  and its colour is a random hue and brightness, also independent of the class. Position:
  anywhere fully inside the image.
- **Pretraining set** (:func:`make_pretraining_split`): the ``PRETRAIN_SHAPES`` classes on the
  ``TEXTURES`` families with random colours; class and background independent (like ImageNet:
  backgrounds are seen, never predictive).
- **Fine-tuning task** (:func:`make_spurious_split`): as a WaterBirds class is a superclass of
  many CUB species, each class of ``FINETUNE_CLASSES`` is a superclass of three sub-shapes that
  pretraining never showed; as a WaterBirds place is a superclass of several Places scene types,
  each background of ``SCENES`` ("land", "water") is a superclass of three texture families, each
  with its own palette jittered per image. In training the background equals the class with
  probability ``spurious_correlation`` (0.95 / 1.0 as WaterBirds-95% / -100%); val and test are
  balanced (every group equally large). Groups are ``2 * class + background``.
- **Unseen scenes** (:func:`make_unseen_scene_split`, after TravelingBirds): the same classes on
  the ``UNSEEN_SCENES`` families, which fine-tuning never shows, class and scene independent: a
  model that decides on the object keeps its accuracy there, one that decides on land/water
  does not.
- **Foregrounds:** the exact object mask of every image, for the Energy Pointing Game.

:func:`colour_histograms` and :func:`linear_probe_accuracy` are the leak check: a linear probe
on per-image colour histograms predicts the class of a balanced split at chance (and the
background almost perfectly, which shows the probe works).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Shapes as predicates on coordinates u (right) and v (down) in [-1, 1] of the object's box.
SHAPES = {
    "disk": lambda u, v: u ** 2 + v ** 2 <= 1,
    "square": lambda u, v: (u.abs() <= 0.9) & (v.abs() <= 0.9),
    "diamond": lambda u, v: u.abs() + v.abs() <= 1,
    "plus": lambda u, v: ((u.abs() <= 1 / 3) & (v.abs() <= 1)) | ((v.abs() <= 1 / 3) & (u.abs() <= 1)),
    "cross": lambda u, v: ((u - v).abs() <= 0.45) | ((u + v).abs() <= 0.45),
    "triangle": lambda u, v: (v >= -1) & (v <= 1) & (u.abs() <= (v + 1) / 2),
    "ring": lambda u, v: (u ** 2 + v ** 2 <= 1) & (u ** 2 + v ** 2 >= 0.36),
    "tee": lambda u, v: (v <= -0.4) | (u.abs() <= 0.3),
    "ell": lambda u, v: (u <= -0.4) | (v >= 0.4),
    "half_disk": lambda u, v: (u ** 2 + v ** 2 <= 1) & (v >= 0),
}
PRETRAIN_SHAPES = tuple(SHAPES)
# Sub-shapes of the fine-tuning classes, none of them in pretraining (as CUB's species are not
# ImageNet's classes): the backbone's shape features must transfer, they cannot be looked up.
SHAPES.update({
    "star": lambda u, v: torch.hypot(u, v) <= 0.55 + 0.45 * torch.cos(5 * torch.atan2(u, -v)),
    "arrow": lambda u, v: ((v.abs() <= 0.25) & (u <= 0.1)) | ((u >= -0.1) & (v.abs() <= 0.9 * (1 - u))),
    "chevron": lambda u, v: (v - u.abs() >= -0.8) & (v - u.abs() <= -0.15),
    "crescent": lambda u, v: (u ** 2 + v ** 2 <= 1) & ((u - 0.5) ** 2 + v ** 2 >= 0.55),
    "ellipse": lambda u, v: u ** 2 + (v / 0.55) ** 2 <= 1,
    "hexagon": lambda u, v: (v.abs() <= 0.866) & (u.abs() + v.abs() / 1.732 <= 1),
})
FINETUNE_CLASSES = {"pointed": ("star", "arrow", "chevron"), "rounded": ("crescent", "ellipse", "hexagon")}
# The study's harder variant: the pretraining pair the pretrained backbone confuses most.
HARDER_CLASSES = {"disk": ("disk",), "diamond": ("diamond",)}
SMALL_AREA_RANGE = (0.02, 0.05)  # the study's harder task: smaller objects, the background's area grows
AREA_RANGE = (0.06, 0.14)  # object area / image area, uniform, the same for every class
TEXTURES = ("blotches", "waves", "stripes", "checker", "gradient", "dots", "noise", "plain")
# Each background a superclass of three texture families, each with a palette: (low, high)
# colour anchors of the two-colour pattern, jittered per image (SCENE_JITTER).
SCENES = {
    "land": {"blotches": ((0.45, 0.35, 0.20), (0.25, 0.45, 0.15)),  # soil and grass
             "stripes": ((0.30, 0.22, 0.12), (0.35, 0.50, 0.20)),   # tree trunks
             "noise": ((0.40, 0.45, 0.15), (0.55, 0.50, 0.30))},    # meadow
    "water": {"waves": ((0.10, 0.30, 0.60), (0.20, 0.45, 0.80)),    # open sea
              "gradient": ((0.15, 0.35, 0.55), (0.55, 0.75, 0.90)),  # shore and sky
              "dots": ((0.10, 0.35, 0.50), (0.35, 0.60, 0.75))},     # lake with ripples
}
BACKGROUND_NAMES = tuple(SCENES)
# TravelingBirds' test scenes: texture families fine-tuning never shows, with random colours.
UNSEEN_SCENES = ("checker", "plain")
SCENE_JITTER = 0.08
MIN_IMAGE_SIZE = 32


class EmbeddedSplit(NamedTuple):
    images: torch.Tensor       # (N, 3, S, S) float32 in [0, 1]
    labels: torch.Tensor       # (N,) int64 class index (into class_names)
    backgrounds: torch.Tensor  # (N,) int64 background index (into background_names)
    foregrounds: torch.Tensor  # (N, 1, S, S) uint8 object mask
    class_names: tuple
    background_names: tuple
    shapes: tuple = ()         # each image's sub-shape (as CUB's species)
    scenes: tuple = ()         # each image's texture family (as Places' scene type)

    def __len__(self):
        return self.labels.shape[0]

    @property
    def groups(self):
        """2 * class + background (the fine-tuning task)."""
        return 2 * self.labels + self.backgrounds

    def as_dataset(self):
        """A :class:`aim.data.common.TensorDataset` for the training loop and evaluation."""
        from aim.data.common import TensorDataset

        if len(self.background_names) == 2:
            group_names = [f"{c}/{b}" for c in self.class_names for b in self.background_names]
            return TensorDataset(self.images, self.labels, self.groups, self.class_names, group_names, self.foregrounds)
        dataset = TensorDataset(self.images, self.labels, self.labels, self.class_names, self.class_names, self.foregrounds)
        dataset.has_groups = False  # the pretraining set: selected on accuracy, per-class accuracy reported
        return dataset


def _shape_fill_fraction(name, resolution=512):
    """Fraction of its box a shape fills, to size boxes so every shape has the drawn area."""
    c = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution * 2 - 1
    return SHAPES[name](c.view(1, -1), c.view(-1, 1)).double().mean().item()


_FILL = {}


def _fill_fraction(name):
    if name not in _FILL:
        _FILL[name] = _shape_fill_fraction(name)
    return _FILL[name]


def _check(num_images, image_size):
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE} for the shapes to be recognizable, got {image_size!r}")


def _paste_objects(images, names, g, area_range=AREA_RANGE):
    """Draw one object per image in place, image i's of shape ``names[i]``; returns the (N, 1,
    S, S) uint8 foregrounds."""
    n, _, s, _ = images.shape
    area = (area_range[0] + (area_range[1] - area_range[0]) * torch.rand(n, generator=g)) * s * s
    fill = torch.tensor([_fill_fraction(name) for name in names], dtype=torch.float32)
    side = (area / fill).sqrt().clamp(max=s - 2)  # box side in pixels (float)
    x0 = torch.rand(n, generator=g) * (s - side)
    y0 = torch.rand(n, generator=g) * (s - side)
    pixel = torch.arange(s, dtype=torch.float32) + 0.5
    u = (pixel.view(1, 1, s) - x0.view(n, 1, 1)) / side.view(n, 1, 1) * 2 - 1
    v = (pixel.view(1, s, 1) - y0.view(n, 1, 1)) / side.view(n, 1, 1) * 2 - 1
    inside_box = (u.abs() <= 1) & (v.abs() <= 1)
    foreground = torch.zeros(n, s, s, dtype=torch.bool)
    for name in sorted(set(names)):
        members = torch.tensor([x == name for x in names])
        foreground[members] = SHAPES[name](u[members], v[members]) & inside_box[members]
    # Colour: random hue at random brightness, independent of the class.
    hue = torch.rand(n, generator=g) * 2 * math.pi
    level = 0.35 + 0.3 * torch.rand(n, 1, generator=g)
    colour = level + 0.3 * torch.stack([torch.cos(hue), torch.cos(hue - 2.094), torch.cos(hue + 2.094)], dim=1)
    images.copy_(torch.where(foreground.unsqueeze(1), colour.view(n, 3, 1, 1), images))
    return foreground.unsqueeze(1).to(torch.uint8)


def _texture(kind, n, s, g):
    """(n, 1, s, s) pattern in [0, 1] of one texture family."""
    ys = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1) / s
    xs = torch.arange(s, dtype=torch.float32).view(1, 1, 1, s) / s
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    freq = 2 * math.pi * (3 + 4 * torch.rand(n, 1, 1, 1, generator=g))
    if kind == "blotches":
        return F.interpolate(torch.rand(n, 1, 6, 6, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    if kind == "waves":
        return 0.5 + 0.5 * torch.sin(freq * ys + 0.15 * torch.sin(2 * math.pi * 2 * xs) + phase)
    if kind == "stripes":
        angle = torch.rand(n, 1, 1, 1, generator=g) * math.pi
        return (torch.sin(freq * (xs * angle.cos() + ys * angle.sin()) + phase) > 0).float()
    if kind == "checker":
        cells = (2 + 5 * torch.rand(n, 1, 1, 1, generator=g)).floor()
        return ((xs * cells).floor() + (ys * cells).floor()).remainder(2)
    if kind == "gradient":
        angle = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
        return (0.5 + 0.5 * (xs - 0.5) * angle.cos() * 2 + 0.5 * (ys - 0.5) * angle.sin() * 2).clamp(0, 1)
    if kind == "dots":
        return (torch.sin(freq * xs + phase) * torch.sin(freq * ys) > 0.5).float()
    if kind == "noise":
        return F.interpolate(torch.rand(n, 1, s // 4, s // 4, generator=g), size=(s, s), mode="nearest")
    if kind == "plain":
        return torch.full((n, 1, s, s), 0.5)
    raise ValueError(f"unknown texture {kind!r}")


def _two_colour(pattern, low, high):
    return low.view(-1, 3, 1, 1) + (high - low).view(-1, 3, 1, 1) * pattern


def _random_colours(n, g):
    return 0.1 + 0.8 * torch.rand(n, 3, generator=g)


def _scene_backgrounds(backgrounds, scenes, s, g):
    """Background i: a texture family of ``scenes[backgrounds[i]]`` (a {family: palette} dict,
    family drawn uniformly) in its palette jittered by SCENE_JITTER, brightness varied. Returns
    the images and each one's family."""
    n = backgrounds.shape[0]
    images, names = torch.empty(n, 3, s, s), [None] * n
    pick = torch.randint(0, 60, (n,), generator=g)  # 60: uniform over 1..6 families
    for b, scene in enumerate(scenes):
        members = torch.nonzero(backgrounds == b).flatten()
        choice = pick[members] % len(scene)
        for k, (family, palette) in enumerate(scene.items()):
            chosen = members[choice == k]
            m = len(chosen)
            if m == 0:
                continue
            if palette is None:
                low, high = _random_colours(m, g), _random_colours(m, g)
            else:
                low, high = ((torch.tensor(anchor) + SCENE_JITTER * torch.randn(m, 3, generator=g)).clamp(0.02, 0.98)
                             for anchor in palette)
            images[chosen] = _two_colour(_texture(family, m, s, g), low, high)
            for i in chosen.tolist():
                names[i] = family
    brightness = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    return images * brightness, tuple(names)


def _finish(images, g):
    """Pixel noise, then 8-bit levels (what a PNG of the image holds)."""
    from torchvision.transforms.v2.functional import to_dtype

    noisy = (images + 0.03 * torch.randn(images.shape, generator=g)).clamp_(0, 1)
    # The file pipeline's own uint8 -> float conversion, so a PNG of the image reads back equal.
    return to_dtype(noisy.mul_(255).round_().to(torch.uint8), torch.float32, scale=True)


def make_pretraining_split(num_images, image_size=64, seed=0):
    """The unbiased pretraining set: class = one of ``PRETRAIN_SHAPES``, background a random texture
    of ``TEXTURES`` with random colours, independent of the class; classes balanced."""
    _check(num_images, image_size)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % len(PRETRAIN_SHAPES)
    labels = labels[torch.randperm(num_images, generator=g)]
    textures = torch.randint(0, len(TEXTURES), (num_images,), generator=g)
    images, scenes = _scene_backgrounds(textures, [{t: None} for t in TEXTURES], image_size, g)
    shapes = tuple(PRETRAIN_SHAPES[k] for k in labels.tolist())
    foregrounds = _paste_objects(images, shapes, g)
    return EmbeddedSplit(_finish(images, g), labels, textures, foregrounds, PRETRAIN_SHAPES, TEXTURES, shapes, scenes)


def check_classes(classes):
    """``classes`` as {name: tuple of sub-shape names}: two classes, each of shapes of SHAPES,
    no shape in both."""
    if not isinstance(classes, dict) or len(classes) != 2:
        raise ValueError(f"classes must be a dict of two class names to sub-shape tuples, got {classes!r}")
    classes = {name: tuple(shapes) for name, shapes in classes.items()}
    members = [shape for shapes in classes.values() for shape in shapes]
    if not all(classes.values()) or not set(members) <= set(SHAPES) or len(set(members)) != len(members):
        raise ValueError(f"classes must hold disjoint, non-empty tuples of names of {tuple(SHAPES)}, got {classes!r}")
    return classes


def make_spurious_split(num_images, image_size=64, spurious_correlation=0.5, seed=0, balanced=False,
                        classes=FINETUNE_CLASSES, area_range=AREA_RANGE, scenes=None):
    """The biased fine-tuning task: class = one of ``classes`` ({name: sub-shapes}, each image's
    sub-shape drawn uniformly in its class), background land / water (each a family of ``SCENES``)
    equal to the class with probability ``spurious_correlation``. ``balanced``: every (class,
    background) group the same size (num_images // 4 each) -- val and test -- ignoring the
    correlation. ``area_range``: (low, high) object area / image area, uniform, the same for
    both classes. ``scenes``: the two backgrounds' {family: palette or None (random colours)}
    (default ``SCENES``)."""
    _check(num_images, image_size)
    classes = check_classes(classes)
    area_range = tuple(area_range)
    if len(area_range) != 2 or not 0 < area_range[0] <= area_range[1] <= 0.5:
        raise ValueError(f"area_range must be (low, high) with 0 < low <= high <= 0.5, got {area_range!r}")
    if isinstance(spurious_correlation, bool) or not isinstance(spurious_correlation, (int, float)) \
            or not 0 <= spurious_correlation <= 1:
        raise ValueError(f"spurious_correlation must be a probability in [0, 1], got {spurious_correlation!r}")
    scenes = SCENES if scenes is None else scenes
    g = torch.Generator().manual_seed(seed)
    if balanced:
        if num_images % 4:
            raise ValueError(f"num_images of a balanced split must be a multiple of the 4 groups, got {num_images}")
        groups = (torch.arange(num_images) % 4)[torch.randperm(num_images, generator=g)]
        labels, backgrounds = groups // 2, groups % 2
    else:
        labels = (torch.arange(num_images) % 2)[torch.randperm(num_images, generator=g)]
        agrees = torch.rand(num_images, generator=g) < spurious_correlation
        backgrounds = torch.where(agrees, labels, 1 - labels)
    images, families = _scene_backgrounds(backgrounds, list(scenes.values()), image_size, g)
    members = list(classes.values())
    sub = torch.randint(0, 60, (num_images,), generator=g).tolist()  # 60: uniform over 1..6 sub-shapes
    names = tuple(members[y][k % len(members[y])] for y, k in zip(labels.tolist(), sub))
    foregrounds = _paste_objects(images, names, g, area_range)
    return EmbeddedSplit(_finish(images, g), labels, backgrounds, foregrounds, tuple(classes), tuple(scenes), names, families)


def make_unseen_scene_split(num_images, image_size=64, seed=0, classes=FINETUNE_CLASSES, area_range=AREA_RANGE):
    """TravelingBirds' test: the classes on the ``UNSEEN_SCENES`` families (random colours), which
    fine-tuning never shows; every (class, scene) group the same size. Its "backgrounds" are the
    unseen families, independent of the class."""
    scenes = {family: {family: None} for family in UNSEEN_SCENES}
    return make_spurious_split(num_images, image_size, seed=seed, balanced=True, classes=classes,
                               area_range=area_range, scenes=scenes)


def colour_histograms(images, bins=4):
    """(N, bins**3) per-image joint RGB histograms (fractions of pixels): the image statistics a
    class must not be predictable from."""
    n = images.shape[0]
    q = (images.clamp(0, 1) * bins).long().clamp_(max=bins - 1)
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = torch.zeros(n, bins ** 3).scatter_add_(1, index.flatten(1), torch.ones(n, index[0].numel()))
    return counts / index[0].numel()


def linear_probe_accuracy(train_features, train_targets, test_features, test_targets, steps=500, weight_decay=1e-3):
    """Held-out accuracy of a logistic-regression probe (full-batch L-BFGS on standardized
    features): near chance means the features carry no linear information about the target."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x, xt = (train_features - mean) / std, (test_features - mean) / std
    classes = int(max(train_targets.max(), test_targets.max())) + 1
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), train_targets) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (probe(xt).argmax(1) == test_targets).float().mean().item()
