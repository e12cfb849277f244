"""aim.data.photos: the WaterBirds-layout set of real photographs from scikit-image's wheel."""
import collections
import csv
import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("skimage", reason="aim.data.photos reads the photographs scikit-image ships (requirements.txt)")

from aim.data import open_split  # noqa: E402
from aim.data import photos  # noqa: E402

COUNTS = {"train": 40, "val": 16, "test": 16}
SIZE = 48


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo_wb")
    rows = photos.write_photo_waterbirds(str(root / "a"), spurious_correlation=0.9, seed=3, image_size=SIZE, counts=COUNTS)
    photos.write_photo_waterbirds(str(root / "b"), spurious_correlation=0.9, seed=3, image_size=SIZE, counts=COUNTS)
    return root, rows


def _metadata(root):
    with open(os.path.join(root, "metadata.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _groups(rows, split):
    return collections.Counter((int(r["y"]), int(r["place"])) for r in rows if int(r["split"]) == split)


def test_metadata_groups(written):
    root, rows = written
    read = _metadata(root / "a")
    assert len(read) == len(rows) == sum(COUNTS.values())
    assert {"img_filename", "y", "place", "split"} <= set(read[0])
    train = _groups(read, 0)
    # round(0.9 * 20) = 18 of each class on its own place.
    assert train == {(0, 0): 18, (0, 1): 2, (1, 1): 18, (1, 0): 2}
    for split in (1, 2):
        assert _groups(read, split) == {(y, p): 4 for y in (0, 1) for p in (0, 1)}
    assert all(r["img_filename"].startswith(f"images/{photos.CLASS_NAMES[int(r['y'])]}/") for r in read)
    # The name columns: the WaterBirds reader names classes and groups after them.
    from aim.data.transforms import eval_transform
    from aim.data.waterbirds import waterbirds_split

    split = waterbirds_split(str(root / "a"), "test", eval_transform(SIZE))
    assert split.class_names == list(photos.CLASS_NAMES)
    assert split.group_names == [f"{c}/{p}" for c in photos.CLASS_NAMES for p in photos.PLACE_NAMES]


def test_full_correlation_train_has_two_groups(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("aim.data.photos opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)  # everything comes from the installed wheel
    rows = photos.write_photo_waterbirds(str(tmp_path), spurious_correlation=1.0, seed=0, image_size=32,
                                         counts={"train": 8, "val": 4, "test": 4})
    assert _groups(_metadata(tmp_path), 0) == {(0, 0): 4, (1, 1): 4}
    assert len(rows) == 16


def test_images_and_segmentations(written):
    root, _ = written
    for row in _metadata(root / "a"):
        with Image.open(root / "a" / row["img_filename"]) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        with Image.open(root / "a" / "segmentations" / (os.path.splitext(row["img_filename"])[0] + ".png")) as seg:
            assert seg.size == (SIZE, SIZE)
            mask = np.asarray(seg) > 0
        ys, xs = np.nonzero(mask)
        # One object, 28-42 % of the side along its longer axis (a little less after the
        # mask's resampling), pasted wholly inside the image.
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        assert 0.2 * SIZE <= extent <= 0.45 * SIZE
        assert 0.02 < mask.mean() < 0.2


def test_same_seed_same_files(written):
    root, _ = written

    def digests(folder):
        return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
                for d, _, files in os.walk(folder) for f in files}

    a, b = digests(root / "a"), digests(root / "b")
    assert a == b and len(a) == 2 * sum(COUNTS.values()) + 1


def test_other_seed_other_images(written, tmp_path):
    root, _ = written
    photos.write_photo_waterbirds(str(tmp_path), spurious_correlation=0.9, seed=4, image_size=SIZE, counts=COUNTS)
    name = _metadata(tmp_path)[0]["img_filename"]
    assert open(tmp_path / name, "rb").read() != open(root / "a" / _metadata(root / "a")[0]["img_filename"], "rb").read()


def test_no_source_shared_between_splits():
    sources = photos.load_sources()
    for per_split in sources["objects"]:
        ids = {split: {crop.tobytes() for crop, _ in items} for split, items in per_split.items()}
        assert all(ids[split] for split in ids)
        assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert [len(sources["objects"][y]["train"]) + len(sources["objects"][y]["val"]) + len(sources["objects"][y]["test"])
            for y in (0, 1)] == [100, 24]
    for per_split in sources["places"]:
        for photo_index in range(len(per_split["train"])):
            tiles = [set(per_split[split][photo_index][1]) for split in ("train", "val", "test")]
            assert all(tiles) and not (tiles[0] & tiles[1]) and not (tiles[0] & tiles[2]) and not (tiles[1] & tiles[2])


def test_aim_data_reads_it_back(written):
    root, _ = written
    for split in ("train", "val", "test"):
        dataset = open_split(str(root / "a"), split, SIZE, segmentations=str(root / "a" / "segmentations"))
        assert len(dataset) == COUNTS[split] and dataset.has_foregrounds
        image, label, group, foreground = dataset[0]
        assert tuple(image.shape) == (3, SIZE, SIZE) and tuple(foreground.shape[-2:]) == (SIZE, SIZE)
        assert foreground.sum() > 0 and group // 2 == label
    val = open_split(str(root / "a"), "val", SIZE)
    assert sorted(collections.Counter(val.groups.tolist()).values()) == [4, 4, 4, 4]


def test_bad_counts():
    with pytest.raises(ValueError, match="divisible by 4"):
        photos.split_groups("val", 6, 1.0)
    with pytest.raises(ValueError, match="even"):
        photos.split_groups("train", 7, 1.0)


def test_pretraining_split_is_unbiased_and_holds_no_task_object():
    """The photo task's pretraining set: classes balanced over the photographs of
    PRETRAIN_OBJECT_PHOTOS (no face, no coin), scene photographs drawn independently of the
    class, deterministic per seed, every image's object marked in its foreground."""
    assert not {"lfw_subset.npy", "coins.png", "astronaut.png", "camera.png"} & set(photos.PRETRAIN_OBJECT_PHOTOS)
    a = photos.make_pretraining_split(60, image_size=32, seed=4)
    b = photos.make_pretraining_split(60, image_size=32, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels).tolist() == [6] * len(photos.PRETRAIN_OBJECT_PHOTOS)
    assert a.images.shape == (60, 3, 32, 32) and 0 <= a.images.min() and a.images.max() <= 1
    assert (a.foregrounds.flatten(1).sum(1) > 0).all()
    assert len(a.background_names) == 8 and len(set(a.backgrounds.tolist())) > 4
    assert a.as_dataset().has_groups is False  # selected on accuracy, as the shapes' pretraining set
    with pytest.raises(ValueError, match="count"):
        photos.make_pretraining_split(5)
