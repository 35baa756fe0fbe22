"""A data set and its splits, and the three ways a split holds its images.

Every data set is a ``DataSet`` with a train split (pre-training, and the kNN memory bank) and,
when labelled, a test split (kNN queries). A ``Split`` holds its images in one of three ways:
equal-size images in one uint8 tensor (built-in data sets, and folders of one image size that
fit in memory), images of their own sizes in an ``ImageStore`` (in memory or on disk), or a
source ``Dataset`` whose files are decoded every epoch. ``Split.held`` is the one place these
are told apart: each way (``InMemory``, ``Stored``, ``Streamed``) takes subsets and reads
batches through the same interface, ``Held``.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sslplug.data.decode import needed_extents, pad_batch
from sslplug.data.loader import Loader
from sslplug.data.store import ImageStore

__all__ = ["DataSet", "Held", "InMemory", "Split", "Stored", "Streamed"]

# A batch as a reader gives it: images (a padded canvas, or for ``encoded`` stored JPEG bytes
# with their lengths), labels, extents (``None`` when the images fill the batch), and the
# positions in the batch of images that could not be read.
Batch = tuple[Any, Tensor, Tensor | None, list[int]]


@attrs.define
class Split:
    """One split: equal-size images in memory (``images``), images of their own sizes in a
    store (``store``, in memory or on disk), or decoded from files every epoch (``source``).

    ``image_size`` is the side of the squares the loader makes of the images of a store or a
    source for consumers that read fixed-size images (0: ``images`` are those squares).
    """

    labels: Tensor
    images: Tensor | None = None
    source: Dataset | None = None
    store: ImageStore | None = None
    image_size: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def held(self) -> Held:
        """How this split holds its images (``images`` first, then ``store``, then
        ``source``)."""
        if self.images is not None:
            return InMemory(self.images)
        if self.store is not None:
            return Stored(self.store)
        assert self.source is not None
        return Streamed(self.source)

    def subset(self, index: Tensor) -> Split:
        """The images ``index`` of this split, held the same way."""
        index = index.cpu()
        return self.held.subset(index).split(self.labels[index], self.image_size)

    def squares(self, index: Tensor | None = None) -> Split:
        """The images ``index`` (all by default) as an in-memory split of uint8 squares at
        ``image_size`` (images of their own sizes are fitted: shorter side, centre square)."""
        part = self if index is None else self.subset(index)
        if part.images is not None and not self.image_size:
            return part
        batches = Loader(part, 256, torch.device("cpu"), shuffle=False, drop_last=False, workers=0)
        chunks = list(batches.epoch(0))
        images = torch.cat([c[0] for c in chunks]) if chunks else torch.empty(0, dtype=torch.uint8)
        labels = torch.cat([c[1] for c in chunks]) if chunks else part.labels[:0]
        return Split(labels, images=images)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


@attrs.define
class DataSet:
    name: str
    train: Split
    test: Split | None
    image_size: int
    classes: tuple[str, ...] = ()
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Held(Protocol):
    """The images of a split, however held.

    ``in_workers``: batches are read in DataLoader worker processes (files decoded, or shard
    files read, every epoch), not in this process from memory. ``reader(labels, encoded)`` is a
    ``Dataset`` of batches: ``reader[indices]`` is a ``Batch`` of the images ``indices``;
    ``encoded`` asks for a store's JPEG bytes in place of its images, left to be decoded where
    the batch goes.
    """

    @property
    def in_workers(self) -> bool: ...

    def subset(self, index: Tensor) -> Held: ...

    def split(self, labels: Tensor, image_size: int) -> Split: ...

    def reader(self, labels: Tensor, encoded: bool) -> Dataset: ...


@attrs.define
class InMemory:
    """Equal-size images in one uint8 tensor ``(N, C, S, S)``."""

    images: Tensor
    in_workers = False

    def subset(self, index: Tensor) -> InMemory:
        return InMemory(self.images[index])

    def split(self, labels: Tensor, image_size: int) -> Split:
        return Split(labels, images=self.images, image_size=image_size)

    def reader(self, labels: Tensor, encoded: bool) -> Dataset:
        return _TensorBatches(self.images, labels)


@attrs.define
class Stored:
    """Images of their own sizes in an ``ImageStore``: read in this process when it is in
    memory, in workers when it is on disk."""

    store: ImageStore

    @property
    def in_workers(self) -> bool:
        return self.store.on_disk

    def subset(self, index: Tensor) -> Stored:
        return Stored(self.store.subset(index))

    def split(self, labels: Tensor, image_size: int) -> Split:
        return Split(labels, store=self.store, image_size=image_size)

    def reader(self, labels: Tensor, encoded: bool) -> Dataset:
        return _StoreBatches(self.store, labels, encoded)


@attrs.define
class Streamed:
    """Image files decoded in workers every epoch: a source ``Dataset`` whose items are
    ``(uint8 (3, h, w), label)``, or ``None`` for a file that cannot be decoded."""

    source: Dataset
    in_workers = True

    def subset(self, index: Tensor) -> Streamed:
        return Streamed(torch.utils.data.Subset(self.source, index.tolist()))

    def split(self, labels: Tensor, image_size: int) -> Split:
        return Split(labels, source=self.source, image_size=image_size)

    def reader(self, labels: Tensor, encoded: bool) -> Dataset:
        return _SourceBatches(self.source)


class _TensorBatches(Dataset):
    """Equal-size images read a batch at a time: ``dataset[indices]`` is their ``Batch``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]) -> Batch:
        return self.images[indices], self.labels[indices], None, []


class _StoreBatches(Dataset):
    """A store read a batch at a time: ``dataset[indices]`` is a padded ``Batch``, or with
    ``encoded`` the images' stored bytes in place of the images, left to be decoded where the
    batch goes (JPEG on a GPU): one after another in one 1-D uint8 tensor, with their lengths
    (one tensor each would pass one file descriptor each out of a worker, see ``pack``)."""

    def __init__(self, store: ImageStore, labels: Tensor, encoded: bool = False) -> None:
        self.store, self.labels, self.encoded = store, labels, encoded

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, indices: list[int]) -> Batch:
        if self.encoded:
            encoded = self.store.encoded(indices)
            packed = (torch.cat(encoded), torch.tensor([len(e) for e in encoded]))
            return packed, self.labels[indices], None, []
        images, extents = self.store.read(indices)
        return images, self.labels[indices], needed_extents(images, extents), []


class _SourceBatches(Dataset):
    """The items of a source decoded a batch at a time: ``dataset[indices]`` is the padded
    ``Batch`` of the readable ones (``_collate``)."""

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]  # a source has a length

    def __getitem__(self, indices: list[int]) -> Batch:
        return _collate([self.source[index] for index in indices])


def _collate(items: list[tuple[Tensor, int] | None]) -> Batch:
    """The readable items as a padded batch ``(images, labels, extents)`` (``pad_batch``;
    extents ``None`` when the images fill the batch), and the positions in ``items`` of the
    unreadable ones."""
    good = [item for item in items if item is not None]
    unreadable = [position for position, item in enumerate(items) if item is None]
    if not good:
        empty = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return empty, torch.empty(0, dtype=torch.int64), None, unreadable
    images, extents = pad_batch([img for img, _ in good])
    labels = torch.tensor([lab for _, lab in good], dtype=torch.int64)
    return images, labels, needed_extents(images, extents), unreadable
