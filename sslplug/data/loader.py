"""The loader that moves a split's uint8 batches to the device.

The loader yields uint8 batches on the device, where augmentation happens: square batches at
``data.image_size`` for every consumer, or, for a view generator that crops at the stored
resolution, a padded canvas and the extents of its images (``sslplug.data.crops``). A split in
memory is read in this process; a streamed one (files decoded, or prepared shard files read)
a batch at a time in DataLoader workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sslplug.data.crops import fit_batch
from sslplug.data.decode import decode_jpegs, needed_extents, pad_batch

if TYPE_CHECKING:
    from sslplug.data.split import Split

__all__ = ["Loader"]


class Loader:
    """Yields batches on ``device``, and measures waiting for them.

    By default a batch is ``(uint8 images (B, C, S, S), labels)``, images of their own sizes
    fitted to the split's ``image_size`` on the device (``fit_batch``). With
    ``full_resolution`` it is ``(images, labels, extents)``: the stored pixels as a padded
    canvas with each image's height and width (``None`` when all fill the canvas), for view
    generators that crop at the stored resolution.

    ``max_batches`` (0: no limit) cuts every epoch short, for smoke tests and quick looks.

    ``wait_seconds`` accumulates the time spent producing batches (indexing or worker output
    plus the transfer), which the engine reports as the data-wait share of step time.

    ``skipped`` is the number of files of a streamed split found unreadable so far, each
    counted once however many epochs meet it. A split in memory was decoded by ``load_data``,
    which counted its unreadable files in ``DataSet.skipped``; so the images a run skipped are
    ``data.skipped + loader.skipped``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        workers: int = 2,
        max_batches: int = 0,
        rank: int = 0,
        world_size: int = 1,
        full_resolution: bool = False,
    ) -> None:
        self.split, self.batch_size, self.device = split, batch_size, device
        self.max_batches = max_batches
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.seed, self.workers = shuffle, drop_last, seed, workers
        self.full_resolution = full_resolution
        self.wait_seconds = 0.0
        self._unreadable: set[int] = set()  # indices into the split's source
        self._pin = device.type == "cuda"
        store = split.store
        # JPEG bytes from a store are decoded on a GPU, a whole batch in one nvJPEG call
        self.decode_on_device = (
            device.type == "cuda" and store is not None and store.encoding == "jpeg"
        )

    @property
    def skipped(self) -> int:
        """Files of a streamed split that could not be decoded, so far (see the class)."""
        return len(self._unreadable)

    def __len__(self) -> int:
        n = len(self.split)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The batches of one epoch; the order depends only on the seed and ``epoch``.

        With ``world_size`` > 1 (distributed training) ``batch_size`` is the batch of all ranks
        together: every rank draws the same order and takes its own contiguous share of each
        batch, so the ranks together see exactly the batches of one process.
        """
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        split = self.split
        for images, labels, extents in self._batches(generator):
            if self.full_resolution:
                yield images, labels, extents
            elif split.image_size and (
                extents is not None
                or images.shape[-1] != split.image_size
                or images.shape[-2] != split.image_size
            ):
                yield fit_batch(images, extents, split.image_size), labels
            else:
                yield images, labels

    def _batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Any]]:
        """This rank's batches of the epoch on the device, ``(images, labels, extents)``: read
        in this process from a split in memory, or in ``workers`` DataLoader processes."""
        batches = [index.tolist() for index in self._index_batches(generator)]
        held = self.split.held
        reader = held.reader(self.split.labels, self.decode_on_device)
        arriving: Iterator[Any]
        if held.in_workers:  # each worker reads whole batches
            loader: DataLoader = DataLoader(
                reader,
                sampler=batches,
                batch_size=None,
                num_workers=self.workers,
                pin_memory=self._pin,
            )
            arriving = iter(loader)
        else:
            arriving = (reader[indices] for indices in batches)
        for indices in batches:  # the DataLoader yields the batches in this order
            start = time.perf_counter()
            images, labels, extents, unreadable = next(arriving)
            self._unreadable.update(indices[position] for position in unreadable)
            if held.in_workers and not len(images):
                continue  # no image of the batch could be read
            batch = self._arrived(images, labels, extents)
            self.wait_seconds += time.perf_counter() - start
            yield batch

    def _to_device(
        self, images: Tensor, labels: Tensor, extents: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if self._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return (
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
            None if extents is None else extents.to(self.device, non_blocking=True),
        )

    def _index_batches(self, generator: torch.Generator) -> list[Tensor]:
        """This rank's indices of every batch of the epoch, from one seeded order."""
        n = len(self.split)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        batches = [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]
        if self.world_size == 1:
            return batches
        share = self.batch_size // self.world_size
        return [batch[self.rank * share : (self.rank + 1) * share] for batch in batches]

    def _arrived(
        self, images: Any, labels: Tensor, extents: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A batch on the device; a store's JPEG bytes decoded there when
        ``decode_on_device``."""
        if not self.decode_on_device:
            return self._to_device(images, labels, extents)
        encoded, lengths = images  # one tensor of the batch's JPEG bytes (``Stored.reader``)
        jpegs = list(encoded.split(lengths.tolist()))
        canvas, extents = pad_batch(decode_jpegs(jpegs, self.device))
        kept = needed_extents(canvas, extents)  # extents are made on the CPU
        return (
            canvas.to(self.device),
            labels.to(self.device, non_blocking=True),
            None if kept is None else kept.to(self.device, non_blocking=True),
        )
