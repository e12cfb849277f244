"""The class-per-folder layout (ImageNet subsets, CUB-200): ``DIR/<split>/<class>/<image>``.
Classes are the folder names under ``DIR/train``, sorted; there are no groups, so per-group
accuracy is per-class accuracy and no worst group is reported."""
import os

from torchvision.datasets.folder import IMG_EXTENSIONS

from aim.data.common import DataError, FileDataset


def class_names(root):
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise DataError(f"{train}: no such folder (the class-per-folder layout needs train/<class>/ folders)")
    names = sorted(e.name for e in os.scandir(train) if e.is_dir())
    if not names:
        raise DataError(f"{train}: no class folders")
    return names


def folder_split(root, split, transform, segmentations=None):
    """One split as a :class:`FileDataset`; with ``segmentations``, the foreground of
    ``split/class/name.jpg`` is ``segmentations/split/class/name.png``."""
    classes = class_names(root)
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    for entry in os.scandir(folder):
        if entry.is_dir() and entry.name not in classes:
            raise DataError(f"{entry.path}: class {entry.name!r} is not among the {len(classes)} classes of {os.path.join(root, 'train')}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for directory, subdirs, files in os.walk(os.path.join(folder, name)):
            subdirs.sort()
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(directory, file))
                    labels.append(label)
    if not paths:
        raise DataError(f"{folder}: the {split} split has no images")
    foregrounds = None
    if segmentations is not None:
        foregrounds = [os.path.join(segmentations, os.path.splitext(os.path.relpath(p, root))[0] + ".png") for p in paths]
    return FileDataset(paths, labels, labels, classes, classes, transform, sources=[None] * len(paths),
                       foreground_paths=foregrounds, has_groups=False)
