"""Datasets, one reader per layout:

- WaterBirds (``DIR/metadata.csv``, group = 2 * y + place): :mod:`aim.data.waterbirds`
- class per folder (``DIR/train/<class>/``, ``DIR/val/<class>/``): :mod:`aim.data.folders`
- the embedded WaterBirds-like generator (no files): :mod:`aim.data.toy`

:func:`open_split` picks the reader from what ``DIR`` holds and checks every file of the split
before anything trains; bad data raises :class:`DataError` with the file (and row) named.
"""
import os

from aim.data.common import DataError, SampleDataset, SeededSampler, ShardSampler, check_sizes, check_split
from aim.data.folders import folder_split
from aim.data.toy import BACKGROUND_NAMES, CLASS_NAMES, ToySplit, batches, make_toy_split
from aim.data.transforms import transform_for
from aim.data.waterbirds import waterbirds_split
from aim.errors import UsageError

SPLITS = ("train", "val", "test")

__all__ = ["DataError", "SampleDataset", "SeededSampler", "ShardSampler", "open_split", "layout_of", "SPLITS",
           "ToySplit", "make_toy_split", "batches", "CLASS_NAMES", "BACKGROUND_NAMES"]


def layout_of(root):
    """"waterbirds" or "folders", from the files in ``root``."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    if os.path.isfile(os.path.join(root, "metadata.csv")):
        return "waterbirds"
    if os.path.isdir(os.path.join(root, "train")):
        return "folders"
    raise DataError(f"{root}: neither metadata.csv (WaterBirds layout) nor train/<class>/ folders (class-per-folder layout)")


def open_split(root, split, image_size, augment=False, segmentations=None, check_threads=1, preprocessing="imagenet"):
    """One split of the dataset in ``root``, every image decoded once to check it.

    augment: the training transform (random resized crop + flip) instead of the evaluation one.
    preprocessing: one of aim.data.transforms.PREPROCESSINGS.
    segmentations: folder of foreground masks for the pointing game (see the readers)."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if segmentations is not None and not os.path.isdir(segmentations):
        raise DataError(f"{segmentations}: no such folder (--segmentations)")
    transform = transform_for(preprocessing, image_size, augment)
    reader = waterbirds_split if layout_of(root) == "waterbirds" else folder_split
    dataset = reader(root, split, transform, segmentations)
    check_split(dataset, f"{root} {split}", check_threads)
    if preprocessing == "raw":
        check_sizes(dataset, image_size)
    return dataset
