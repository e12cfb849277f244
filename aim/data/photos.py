"""A WaterBirds-like set made of real photographs that scikit-image ships inside its wheel
(``skimage/data``): nothing is downloaded, the files are read straight from the installed
package (scikit-image==0.26.0, pinned in requirements.txt).

Objects, the class ``y`` (both grey photographs, both cut to a round silhouette, so the shape of
the foreground does not give the class away):

- 0 "face": the 100 face crops of the LFW subset (``lfw_subset.npy``, 25x25 grey, the first 100
  of its 200 crops), each cut to its inscribed disk;
- 1 "coin": the 24 coins of ``coins.png`` (a photograph of Greek coins), each with its own
  silhouette from the watershed of the Sobel map (scikit-image's gallery recipe), computed once.

Scenes, the ``place`` (the shortcut):

- 0 "ground": grey photographs of surfaces: grass, gravel, brick, the moon's surface;
- 1 "scene": colour photographs: the Hubble deep field, a rocket on its launch pad at night, a
  motorcycle in a garage (left view of the stereo pair), a coffee cup on a wooden table.

An image: a random square crop of one photograph of its place, resized to S x S, flipped at
random; the object, flipped at random, its brightness set to a random level (the same range for
both classes, so mean brightness does not give the class away), resized so its larger side is
``object_scale`` (28-42 %) of S, pasted at a random position fully inside the image -- a small
object on a large scene, as in WaterBirds. The segmentation is exactly the pasted pixels.

No source is shared between splits: each object instance belongs to one split (instance index
mod 5: 0-2 train, 3 val, 4 test), and each scene photograph is cut into a grid of square tiles
assigned the same way, every crop lying inside one tile of its split.

Groups: train has half of each class, of which round(p * n / 2) lie on the place equal to their
class (p = ``spurious_correlation``, WaterBirds has about 0.95); val and test hold n / 4 images
of every (class, place) group, so the background is balanced within each class.
"""
import importlib.util
import os

import numpy as np

CLASS_NAMES = ("face", "coin")
PLACE_NAMES = ("ground", "scene")
# File names inside skimage/data, per place.
PLACE_PHOTOS = (("grass.png", "gravel.png", "brick.png", "moon.png"),
                ("hubble_deep_field.jpg", "rocket.jpg", "motorcycle_left.png", "coffee.png"))
FACES_FILE, COINS_FILE = "lfw_subset.npy", "coins.png"
# The pretraining set's classes (make_pretraining_split): other photographs of the wheel, none of a
# face or a coin (astronaut.png and camera.png show faces: left out), as ImageNet holds no CUB bird.
PRETRAIN_OBJECT_PHOTOS = ("cell.png", "chelsea.png", "clock_motion.png", "ihc.png", "logo.png", "page.png",
                          "phantom.png", "retina.jpg", "text.png", "horse.png")
DEFAULT_COUNTS = {"train": 800, "val": 200, "test": 400}
SPLIT_OF_INDEX = ("train", "train", "train", "val", "test")  # instance or tile index mod 5
TILES_PER_SIDE = 4  # tiles along the shorter side of a scene photograph


def skimage_data_dir():
    """The folder of photographs inside the installed scikit-image (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("aim.data.photos reads the photographs that scikit-image ships in its wheel: "
                          "pip install scikit-image==0.26.0 (pinned in requirements.txt)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [name for name in (FACES_FILE, COINS_FILE, *PLACE_PHOTOS[0], *PLACE_PHOTOS[1], *PRETRAIN_OBJECT_PHOTOS)
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ImportError(f"{folder}: the installed scikit-image lacks {', '.join(missing)} "
                          "(aim.data.photos expects scikit-image==0.26.0, whose wheel ships them)")
    return folder


def load_sources(data_dir=None):
    """{"objects": [(class, [(grey uint8 HxW, bool HxW mask), ...] per split)], "places": ...}:
    objects[y][split] is the list of instances of class y in that split; places as :func:`_load_places`."""
    from PIL import Image

    folder = data_dir or skimage_data_dir()
    faces = np.load(os.path.join(folder, FACES_FILE))[:100]  # (100, 25, 25) float in [0, 1]
    disk = _disk(faces.shape[1])
    face_items = [((face * 255).round().astype(np.uint8), disk) for face in faces]
    with Image.open(os.path.join(folder, COINS_FILE)) as image:
        coins = np.asarray(image.convert("L"))
    coin_items = _segment_coins(coins)

    return {"objects": [_by_split(face_items), _by_split(coin_items)], "places": _load_places(folder)}


def _load_places(folder):
    """places[p][split]: the list of (RGB uint8 photo, [(top, left, side) tile, ...]) of place p."""
    from PIL import Image

    places = []
    for names in PLACE_PHOTOS:
        per_split = {split: [] for split in ("train", "val", "test")}
        for name in names:
            with Image.open(os.path.join(folder, name)) as image:
                photo = np.asarray(image.convert("RGB"))
            tiles = _tiles(photo.shape[:2])
            for split in per_split:
                per_split[split].append((photo, [t for k, t in enumerate(tiles) if SPLIT_OF_INDEX[k % 5] == split]))
        places.append(per_split)
    return places


def _disk(side):
    centre = (side - 1) / 2
    ys, xs = np.mgrid[:side, :side]
    return (ys - centre) ** 2 + (xs - centre) ** 2 <= (side / 2) ** 2


def _segment_coins(coins):
    """The coins of coins.png as (grey crop, mask): watershed of the Sobel map
    from markers on the dark background (< 30) and the bright coins (> 150), holes filled,
    regions under 500 pixels (specks) dropped -- 24 coins."""
    from scipy import ndimage
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    markers = np.zeros(coins.shape, np.uint8)
    markers[coins < 30], markers[coins > 150] = 1, 2
    foreground = ndimage.binary_fill_holes(watershed(sobel(coins), markers) == 2)
    labels, count = ndimage.label(foreground)
    items = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        mask = labels[box] == index + 1
        if mask.sum() >= 500:
            items.append((coins[box].copy(), mask))
    return items  # in the order of ndimage.label: by each coin's first pixel in raster order


def _by_split(items):
    return {split: [item for k, item in enumerate(items) if SPLIT_OF_INDEX[k % 5] == split]
            for split in ("train", "val", "test")}


def _tiles(shape):
    height, width = shape
    side = min(height, width) // TILES_PER_SIDE
    return [(row * side, col * side, side) for row in range(height // side) for col in range(width // side)]


def split_groups(split, count, spurious_correlation):
    """(labels, places) of a split, in the order written, before shuffling."""
    if split == "train":
        if count % 2:
            raise ValueError(f"the train split needs an even count (half of each class), got {count}")
        per_class = count // 2
        aligned = round(spurious_correlation * per_class)
        labels, places = [], []
        for y in (0, 1):
            labels += [y] * per_class
            places += [y] * aligned + [1 - y] * (per_class - aligned)
        return np.array(labels), np.array(places)
    if count % 4:
        raise ValueError(f"the {split} split needs a count divisible by 4 (one quarter per group), got {count}")
    groups = np.repeat(np.arange(4), count // 4)
    return groups // 2, groups % 2


def make_pretraining_split(count, image_size=64, seed=0, object_scale=(0.28, 0.42), data_dir=None):
    """The unbiased pretraining set of the photo task, as ImageNet is WaterBirds': class = one of
    ``PRETRAIN_OBJECT_PHOTOS`` (classes balanced); each object a random square crop of that
    photograph (25-60% of its shorter side), grey, cut to a disk, pasted as the task's objects are
    (random brightness and size, ``_paste``) on a crop of one of the eight scene photographs drawn
    independently of the class, from the tiles of the task's train split only. So the backbone
    learns to find and tell apart grey objects on both places, and never sees a face or a coin.
    Returns an :class:`aim.data.embedded.EmbeddedSplit` (backgrounds: the scene photograph)."""
    import torch
    from PIL import Image

    from aim.data.embedded import EmbeddedSplit

    if count < len(PRETRAIN_OBJECT_PHOTOS):
        raise ValueError(f"count must be at least {len(PRETRAIN_OBJECT_PHOTOS)} (one image per class), got {count}")
    folder = data_dir or skimage_data_dir()
    greys = []
    for name in PRETRAIN_OBJECT_PHOTOS:
        with Image.open(os.path.join(folder, name)) as image:
            greys.append(np.asarray(image.convert("L")))
    scenes = [scene for place in _load_places(folder) for scene in place["train"]]
    scene_names = tuple(name for names in PLACE_PHOTOS for name in names)
    rng = np.random.default_rng([seed, 3])
    labels = rng.permutation(np.arange(count) % len(PRETRAIN_OBJECT_PHOTOS))
    backgrounds = rng.integers(len(scenes), size=count)
    s = image_size
    images = np.empty((count, s, s, 3), np.uint8)
    foregrounds = np.zeros((count, s, s), np.uint8)
    for i in range(count):
        photo, tiles = scenes[backgrounds[i]]
        images[i] = _scene_crop(photo, tiles[rng.integers(len(tiles))], s, rng)
        grey = greys[labels[i]]
        side = int(rng.integers(int(0.25 * min(grey.shape)), int(0.6 * min(grey.shape)) + 1))
        y0, x0 = int(rng.integers(grey.shape[0] - side + 1)), int(rng.integers(grey.shape[1] - side + 1))
        _paste(images[i], foregrounds[i], grey[y0:y0 + side, x0:x0 + side], _disk(side), s, object_scale, rng)
    names = tuple(os.path.splitext(name)[0] for name in PRETRAIN_OBJECT_PHOTOS)
    return EmbeddedSplit(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels).long(),
                         torch.from_numpy(backgrounds).long(), torch.from_numpy(foregrounds)[:, None], names, scene_names,
                         tuple(names[k] for k in labels.tolist()), tuple(scene_names[k] for k in backgrounds.tolist()))


def make_photo_split(sources, split, count, image_size=64, spurious_correlation=1.0, seed=0,
                     object_scale=(0.28, 0.42)):
    """One split as (ToySplit, foregrounds (N, S, S) uint8)."""
    import torch

    from aim.data.toy import ToySplit

    split_index = ("train", "val", "test").index(split)
    rng = np.random.default_rng([seed, split_index])
    labels, places = split_groups(split, count, spurious_correlation)
    order = rng.permutation(count)
    labels, places = labels[order], places[order]
    s = image_size
    images = np.empty((count, s, s, 3), np.uint8)
    foregrounds = np.zeros((count, s, s), np.uint8)
    boxes = np.empty((count, 4), np.int64)
    for i in range(count):
        photo, tiles = sources["places"][places[i]][split][rng.integers(len(sources["places"][places[i]][split]))]
        images[i] = _scene_crop(photo, tiles[rng.integers(len(tiles))], s, rng)
        instances = sources["objects"][labels[i]][split]
        grey, mask = instances[rng.integers(len(instances))]
        boxes[i] = _paste(images[i], foregrounds[i], grey, mask, s, object_scale, rng)
    data = ToySplit(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels).long(),
                    torch.from_numpy(places).long(), torch.from_numpy(boxes))
    return data, torch.from_numpy(foregrounds)


def _scene_crop(photo, tile, s, rng):
    from PIL import Image

    top, left, side = tile
    crop = int(rng.integers(int(0.6 * side), side + 1))
    y0, x0 = top + int(rng.integers(side - crop + 1)), left + int(rng.integers(side - crop + 1))
    image = Image.fromarray(photo[y0:y0 + crop, x0:x0 + crop]).resize((s, s), Image.LANCZOS)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def _paste(image, foreground, grey, mask, s, object_scale, rng):
    """Paste the object into ``image`` (in place), mark its pixels in ``foreground``; its box."""
    from PIL import Image

    if rng.random() < 0.5:
        grey, mask = grey[:, ::-1], mask[:, ::-1]
    values = grey[mask].astype(np.float64)
    level = rng.uniform(0.35, 0.65) * 255
    grey = np.clip((grey - values.mean()) + level, 0, 255).round().astype(np.uint8)
    longest = max(4, round(rng.uniform(*object_scale) * s))
    height, width = mask.shape
    size = (max(1, round(width * longest / max(height, width))), max(1, round(height * longest / max(height, width))))
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(grey)).resize(size, Image.LANCZOS))
    mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask).astype(np.uint8) * 255).resize(size, Image.BILINEAR)) >= 128
    h, w = mask.shape
    y0, x0 = int(rng.integers(s - h + 1)), int(rng.integers(s - w + 1))
    region = image[y0:y0 + h, x0:x0 + w]
    region[mask] = grey[mask][:, None]
    foreground[y0:y0 + h, x0:x0 + w] = mask
    ys, xs = np.nonzero(mask)
    return (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)


def write_photo_waterbirds(root, spurious_correlation=1.0, seed=0, image_size=64, counts=None, image_format="jpg"):
    """Write the set in the WaterBirds layout (aim.data.toy.save_waterbirds_layout):
    root/metadata.csv, root/images/{face,coin}/<split>_<i>.jpg, root/segmentations/... .png.
    counts: {"train": n, "val": n, "test": n} (default DEFAULT_COUNTS). Returns the metadata rows."""
    from aim.data.toy import save_waterbirds_layout

    if not 0 <= spurious_correlation <= 1:
        raise ValueError(f"spurious_correlation must be a probability, got {spurious_correlation}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for the objects to be recognizable, got {image_size}")
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    sources = load_sources()
    splits, foregrounds = {}, {}
    for split in ("train", "val", "test"):
        splits[split], foregrounds[split] = make_photo_split(sources, split, counts[split], image_size,
                                                             spurious_correlation, seed)
    return save_waterbirds_layout(root, splits, image_format, class_names=CLASS_NAMES, foregrounds=foregrounds,
                                  place_names=PLACE_NAMES)
