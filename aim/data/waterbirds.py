"""The WaterBirds layout (kohpangwei/group_DRO data/cub_dataset.py): ``DIR/metadata.csv`` with
columns img_filename, y, split (0 train, 1 val, 2 test) and place; the group of a sample is
2 * y + place. Image paths are relative to DIR. Optional columns class_name and place_name (as
`aim data embedded` writes; other readers ignore them) name the classes and places; without them
the names are WaterBirds'."""
import csv
import os

from aim.data.common import DataError, FileDataset

SPLITS = {"train": 0, "val": 1, "test": 2}
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
CLASS_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")


def read_metadata(root):
    """Rows of metadata.csv as (line number, img_filename, y, split, place), every value checked,
    and the (class names, place names)."""
    path = os.path.join(root, "metadata.csv")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # tolerates a byte-order mark
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                f"(needs {', '.join(REQUIRED_COLUMNS)})")
            rows, names, first_listed = [], ({}, {}), {}  # first_listed: img_filename -> (line, y)
            for row in reader:
                line = reader.line_num
                values = [_int(row, column, path, line) for column in ("y", "split", "place")]
                for column, value, allowed in zip(("y", "split", "place"), values, (CLASS_NAMES, SPLITS, PLACE_NAMES)):
                    if not 0 <= value < len(allowed):
                        raise DataError(f"{path} line {line}: {column} = {value} is out of range (0..{len(allowed) - 1})")
                if not row["img_filename"]:
                    raise DataError(f"{path} line {line}: empty img_filename")
                earlier_line, earlier_y = first_listed.setdefault(row["img_filename"], (line, values[0]))
                if earlier_y != values[0]:
                    raise DataError(f"{path} lines {earlier_line} and {line}: {row['img_filename']} is listed with "
                                    f"y = {earlier_y} and y = {values[0]}")
                rows.append((line, row["img_filename"], *values))
                for column, value, seen in (("class_name", values[0], names[0]), ("place_name", values[2], names[1])):
                    if row.get(column):
                        if seen.setdefault(value, row[column]) != row[column]:
                            raise DataError(f"{path} line {line}: {column} {row[column]!r} differs from "
                                            f"{seen[value]!r} given for the same {column[:-5]} {value}")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    return rows, tuple(_names(seen, default, column, path) for seen, default, column in
                       zip(names, (CLASS_NAMES, PLACE_NAMES), ("class_name", "place_name")))


def _names(seen, default, column, path):
    if not seen:
        return default
    if sorted(seen) != list(range(len(default))):
        raise DataError(f"{path}: column {column} must name every value 0..{len(default) - 1}, got {sorted(seen)}")
    return tuple(seen[i] for i in range(len(default)))


def _int(row, column, path, line):
    value = row[column]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path} line {line}: {column} = {value!r} is not an integer") from None


def waterbirds_split(root, split, transform, segmentations=None):
    """One split as a :class:`FileDataset`; with ``segmentations``, the foreground of
    ``img_filename`` is ``segmentations/<img_filename with suffix .png>``."""
    rows, (class_names, place_names) = read_metadata(root)
    rows = [r for r in rows if r[3] == SPLITS[split]]
    if not rows:
        raise DataError(f"{os.path.join(root, 'metadata.csv')}: the {split} split (split = {SPLITS[split]}) has no rows")
    paths = [os.path.join(root, r[1]) for r in rows]
    foregrounds = None
    if segmentations is not None:
        foregrounds = [os.path.join(segmentations, os.path.splitext(r[1])[0] + ".png") for r in rows]
    group_names = [f"{c}/{p}" for c in class_names for p in place_names]
    return FileDataset(paths, [r[2] for r in rows], [2 * r[2] + r[4] for r in rows], class_names, group_names, transform,
                       sources=[f"metadata.csv line {r[0]}" for r in rows], foreground_paths=foregrounds)
