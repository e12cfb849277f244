"""Tiny datasets on disk, in both layouts aim train reads, made from the embedded generator:
WaterBirds (metadata.csv, images/, segmentations/ with the object boxes as foregrounds) and
class per folder (train/, val/, test/ with one folder per class)."""
import csv
import os

import torch
from PIL import Image

from aim.data import make_toy_split
from aim.metrics import boxes_to_foreground

SPLIT_SIZES = {"train": 32, "val": 16, "test": 16}


def _save(tensor, path):
    array = (tensor.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)


def make_waterbirds(root, image_size=32, sizes=SPLIT_SIZES, seed=0):
    """metadata.csv (img_id, img_filename, y, split, place, place_filename) with JPEG images
    under images/<class folder>/ and each foreground at segmentations/<img_filename>.png."""
    rows = []
    for split_index, (split, count) in enumerate(sizes.items()):
        data = make_toy_split(count, image_size, 0.9 if split == "train" else 0.5, seed=seed + split_index)
        foregrounds = boxes_to_foreground(data.boxes, (image_size, image_size))
        for i in range(count):
            name = f"{int(data.labels[i])}.class/{split}_{i:03d}.jpg"
            os.makedirs(os.path.join(root, "images", os.path.dirname(name)), exist_ok=True)
            os.makedirs(os.path.join(root, "segmentations", "images", os.path.dirname(name)), exist_ok=True)
            _save(data.images[i], os.path.join(root, "images", name))
            Image.fromarray((foregrounds[i] * 255).numpy()).save(os.path.join(root, "segmentations", "images", name[:-4] + ".png"))
            rows.append({"img_id": len(rows) + 1, "img_filename": "images/" + name, "y": int(data.labels[i]), "split": split_index,
                         "place": int(data.backgrounds[i]), "place_filename": "/x/place.jpg"})
    write_metadata(root, rows)
    return rows


def write_metadata(root, rows, columns=None):
    columns = columns or list(rows[0])
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_folders(root, image_size=32, sizes=SPLIT_SIZES, seed=0, classes=("disk", "plus")):
    """root/<split>/<class>/<i>.png from the generator (class = object shape)."""
    for split_index, (split, count) in enumerate(sizes.items()):
        data = make_toy_split(count, image_size, 0.5, seed=seed + split_index)
        for i in range(count):
            folder = os.path.join(root, split, classes[int(data.labels[i])])
            os.makedirs(folder, exist_ok=True)
            _save(data.images[i], os.path.join(folder, f"{i:03d}.png"))
