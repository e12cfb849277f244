"""Tiny datasets on disk in both layouts `aim train` reads, from the embedded generator
(aim.data.toy): 32 training, 16 val and 16 test images of 32x32."""
import csv
import os

from aim.data import make_toy_split
from aim.data.toy import save_folder_layout, save_waterbirds_layout

SPLIT_SIZES = {"train": 32, "val": 16, "test": 16}


def _splits(image_size, seed):
    return {split: make_toy_split(count, image_size, 0.9 if split == "train" else 0.5, seed=seed + i)
            for i, (split, count) in enumerate(SPLIT_SIZES.items())}


def make_waterbirds(root, image_size=32, seed=0):
    """metadata.csv, images/<class>/*.jpg, segmentations/images/<class>/*.png; returns the rows."""
    return save_waterbirds_layout(root, _splits(image_size, seed))


def make_folders(root, image_size=32, seed=0):
    """<split>/<class>/*.png, classes "disk" and "plus"."""
    save_folder_layout(root, _splits(image_size, seed))


def write_metadata(root, rows, columns=None):
    """Rewrite metadata.csv (for the bad-data cases)."""
    columns = columns or list(rows[0])
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
