"""What every reader shares: the dataset of image files, the seeded
sampler (augmentation and order a function of seed, epoch and index only), image checks."""
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler

from aim.data.transforms import load_foreground, load_image
from aim.errors import DataError, first_line


class SampleDataset(Dataset):
    """Samples of one split with the attributes the training loop and evaluation need.

    labels, groups: (N,) int64; num_classes, class_names; has_groups: False for layouts
    without groups (then groups == labels and per-group accuracy is per-class accuracy);
    num_groups, group_names; has_foregrounds: items carry a foreground mask for the pointing game.

    An item is (image, label, group) or (image, label, group, foreground). The key is an index,
    or (index, seed) from :class:`SeededSampler`: then the random transform draws from a
    generator seeded with ``seed``, so augmentation does not depend on worker, rank or what ran
    before (exact resume, DDP equal to one process).
    """

    has_groups = True

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self.load(index)
        # The CPU generator directly: torch.manual_seed/fork_rng also visit every other
        # device's generators (measured 80 us a sample against 2 us).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.load(index)
        finally:
            generator.set_state(state)

    def load(self, index):
        raise NotImplementedError


class FileDataset(SampleDataset):
    """Image files (and optional foreground mask files), transformed with transforms.v2.

    ``sources[i]`` says where sample i was listed (e.g. "metadata.csv line 7"), for errors."""

    def __init__(self, paths, labels, groups, class_names, group_names, transform, sources,
                 foreground_paths=None, has_groups=True):
        self.paths, self.sources, self.transform = list(paths), list(sources), transform
        self.labels, self.groups = torch.as_tensor(labels, dtype=torch.int64), torch.as_tensor(groups, dtype=torch.int64)
        self.class_names, self.group_names = list(class_names), list(group_names)
        self.num_classes, self.num_groups = len(self.class_names), len(self.group_names)
        self.foreground_paths = foreground_paths
        self.has_foregrounds = foreground_paths is not None
        self.has_groups = has_groups

    def load(self, index):
        image = load_image(self.paths[index])
        label, group = self.labels[index], self.groups[index]
        if not self.has_foregrounds:
            return self.transform(image), label, group
        image, foreground = self.transform(image, load_foreground(self.foreground_paths[index], image.size))
        return image, label, group, foreground

    def where(self, index):
        """The file of sample ``index`` and, if known, where it was listed."""
        source = self.sources[index]
        return f"{self.paths[index]}" + (f" ({source})" if source else "")


class TensorDataset(SampleDataset):
    """In-memory images (the embedded generator): (N, 3, S, S) float images used as they are."""

    def __init__(self, images, labels, groups, class_names, group_names, foregrounds=None):
        self.images, self.foregrounds = images, foregrounds
        self.labels, self.groups = labels, groups
        self.class_names, self.group_names = list(class_names), list(group_names)
        self.num_classes, self.num_groups = len(self.class_names), len(self.group_names)
        self.has_foregrounds = foregrounds is not None

    def load(self, index):
        item = (self.images[index], self.labels[index], self.groups[index])
        return item + (self.foregrounds[index],) if self.has_foregrounds else item


# What PIL raises for a file it cannot decode; DecompressionBombError (an image of more than
# twice Image.MAX_IMAGE_PIXELS) is neither an OSError nor a ValueError.
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def check_split(dataset, split, threads=1):
    """Decode every image (and foreground mask) of a split once, before any training, so a
    missing or corrupt file ends the run with a :class:`DataError` naming it."""
    if len(dataset) == 0:
        raise DataError(f"{split}: the split has no images")
    if not isinstance(dataset, FileDataset):
        return

    def check(index):
        try:
            size = load_image(dataset.paths[index], check=True)
        except UNREADABLE as error:
            raise DataError(f"{dataset.where(index)}: cannot be read as an image ({_reason(error)})") from None
        if dataset.has_foregrounds:
            try:
                load_foreground(dataset.foreground_paths[index], size, check=True)
            except DataError:
                raise
            except UNREADABLE as error:
                raise DataError(f"{dataset.foreground_paths[index]} (foreground of {dataset.paths[index]}): "
                                f"cannot be read as a mask ({_reason(error)})") from None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for _ in pool.map(check, range(len(dataset))):
            pass


def check_sizes(dataset, image_size):
    """Every image of a :class:`FileDataset` is image_size x image_size (the "raw" preprocessing
    uses images as they are); else a :class:`DataError` naming the first that is not."""
    for index, path in enumerate(dataset.paths):
        with Image.open(path) as image:
            if image.size != (image_size, image_size):
                raise DataError(f"{dataset.where(index)}: the image is {image.size[0]}x{image.size[1]}; preprocessing 'raw' "
                                f"uses images as they are and needs {image_size}x{image_size} (--image-size)")


def _reason(error):
    from PIL import UnidentifiedImageError

    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL knows"
    return first_line(error)


def sample_seed(seed, epoch, index):
    """The augmentation seed of one sample in one epoch of a run."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63)


class SeededSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch from seed + epoch, this rank's share) yielding
    (index, augmentation seed) keys for :class:`SampleDataset`."""

    def __iter__(self):
        for index in super().__iter__():
            yield index, sample_seed(self.seed, self.epoch, index)


class ShardSampler(Sampler):
    """Evaluation order: this rank's indices rank, rank + world, ... with no padding, so sums
    reduced over ranks count every sample once."""

    def __init__(self, length, rank=0, world_size=1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
