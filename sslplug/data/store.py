"""The stored form of images of their own sizes: ``ImageStore``, and reading prepared data.

An ``ImageStore`` holds images one after another as uint8 ``(3, h, w)`` pixels (``raw``) or as
JPEG bytes re-encoded at the stored size (``jpeg``, about six times smaller; decoded with
TorchCodec when installed, whose CUDA decoder takes a whole batch in one nvJPEG call), in memory
or in shard files on disk read with ``os.pread`` (bounded host memory: a batch at a time).
``sslplug prepare DATA OUT`` writes the on-disk form once (``sslplug.data.write``); ``--data
OUT`` then streams it (``read_store``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from sslplug.data.decode import decode_jpegs, pad_batch
from sslplug.errors import DataError

__all__ = ["STORE_MARKER", "Encoding", "ImageStore", "read_store"]

STORE_MARKER = "sslplug-data.json"
STORE_VERSION = 1
SHARD_BYTES = 1 << 30
Encoding = Literal["raw", "jpeg"]


@attrs.define
class ImageStore:
    """Images of their own sizes, one after another: in memory or in shard files.

    ``shapes`` ``(N, 2)`` heights and widths; image ``i`` is ``lengths[i]`` bytes at
    ``offsets[i]`` of shard ``shard[i]``; ``shards`` are uint8 tensors (in memory) or file
    paths (read a batch at a time with ``os.pread``, each worker process with its own files).
    """

    shapes: Tensor
    offsets: Tensor
    lengths: Tensor
    shard: Tensor
    shards: list[Any]
    encoding: Encoding = "raw"
    _files: dict[tuple[int, int], int] = attrs.field(factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    @property
    def on_disk(self) -> bool:
        return bool(self.shards) and not isinstance(self.shards[0], Tensor)

    def _bytes(self, index: int) -> Tensor:
        shard, offset, length = (
            int(self.shard[index]),
            int(self.offsets[index]),
            int(self.lengths[index]),
        )
        source = self.shards[shard]
        if isinstance(source, Tensor):
            return source[offset : offset + length]
        key = (os.getpid(), shard)
        if key not in self._files:
            self._files[key] = os.open(source, os.O_RDONLY)
        data = os.pread(self._files[key], length, offset)
        if len(data) != length:
            raise DataError(
                f"the prepared data file {str(source)!r} is shorter than its index says "
                f"(image {index}); prepare the data again with sslplug prepare"
            )
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def encoded(self, indices: Iterable[int]) -> list[Tensor]:
        """The stored bytes of the images at ``indices`` (raw pixels, or JPEG)."""
        return [self._bytes(i) for i in indices]

    def images(self, indices: Iterable[int]) -> list[Tensor]:
        """The images at ``indices``, uint8 ``(3, h, w)`` each."""
        indices = list(indices)
        encoded = self.encoded(indices)
        if self.encoding == "jpeg":
            return decode_jpegs(encoded)
        return [
            e.view(3, int(self.shapes[i, 0]), int(self.shapes[i, 1]))
            for e, i in zip(encoded, indices)
        ]

    def read(self, indices: Iterable[int]) -> tuple[Tensor, Tensor]:
        """A padded batch and its extents (``pad_batch``) of the images at ``indices``."""
        return pad_batch(self.images(indices))

    def subset(self, index: Tensor) -> ImageStore:
        """The images ``index`` of this store, read from the same shards."""
        return ImageStore(
            self.shapes[index],
            self.offsets[index],
            self.lengths[index],
            self.shard[index],
            self.shards,
            self.encoding,
        )

    def shard_ends(self) -> list[int]:
        """For each shard, the byte where the last of its images ends (what it must hold)."""
        ends = torch.zeros(len(self.shards), dtype=torch.int64)
        if len(self.lengths):
            ends.scatter_reduce_(0, self.shard, self.offsets + self.lengths, "amax")
        return [int(end) for end in ends]

    def in_memory(self) -> ImageStore:
        """This store with every shard read into memory; a ``DataError`` naming a shard file
        that is missing or shorter than the images the index places in it."""
        if not self.on_disk:
            return self
        shards = []
        for path, needed in zip(self.shards, self.shard_ends()):
            size = _file_size(path, needed)
            shards.append(torch.from_file(str(path), size=size, dtype=torch.uint8))
        return ImageStore(self.shapes, self.offsets, self.lengths, self.shard, shards,
                          self.encoding)

    @classmethod
    def from_images(cls, images: Sequence[Tensor]) -> ImageStore:
        """An in-memory raw store of uint8 ``(3, h, w)`` images."""
        shapes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.int64)
        flat = (
            torch.cat([image.reshape(-1) for image in images])
            if images
            else torch.empty(0, dtype=torch.uint8)
        )
        return cls.from_pixels(flat.to(torch.uint8), shapes.view(-1, 2))

    @classmethod
    def from_pixels(cls, pixels: Tensor, shapes: Tensor) -> ImageStore:
        """An in-memory raw store of images whose uint8 pixels lie one after another in
        ``pixels`` (each ``(3, h, w)``, C order), with heights and widths ``shapes`` ``(N, 2)``."""
        lengths = shapes.prod(dim=1) * 3
        offsets = torch.cumsum(lengths, 0) - lengths
        if int(lengths.sum()) != len(pixels):
            raise ValueError(
                f"{len(pixels)} bytes of pixels for images of {int(lengths.sum())} bytes"
            )
        return cls(shapes, offsets, lengths, torch.zeros(len(shapes), dtype=torch.int64),
                   [pixels])


def _file_size(path: str | Path, needed: int) -> int:
    """The size of the prepared data file ``path``; a ``DataError`` when it is missing or
    shorter than ``needed``, the byte where the last image the index places in it ends."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DataError(
            f"cannot read the prepared data file {str(path)!r}: {exc.strerror or exc}. Prepare "
            f"the data again with sslplug prepare"
        ) from None
    if size < needed:
        raise DataError(
            f"the prepared data file {str(path)!r} is {size} bytes, but the index.pt beside it "
            f"places images in it up to byte {needed}: the file is cut short or damaged. "
            f"Prepare the data again with sslplug prepare"
        )
    return size


_MARKER_FIELDS = {
    "image_size": "a positive integer",
    "short_side": "a positive integer",
    "encoding": "'raw' or 'jpeg'",
    "classes": "a list of class names",
}
_INDEX_TENSORS = ("shapes", "offsets", "lengths", "shard", "labels")


def _marker_problem(marker: Any) -> str | None:
    """What is wrong with the content of a marker file, or ``None``."""
    if not isinstance(marker, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(marker), "a number")
        return f"it holds {kind}, not the JSON object sslplug prepare writes"
    if marker.get("format") != "sslplug-prepared":
        return f"its format is {marker.get('format')!r}, not 'sslplug-prepared'"
    if marker.get("version") != STORE_VERSION:
        return None  # said apart, with the version
    checks = {
        "image_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "short_side": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "encoding": lambda v: v in ("raw", "jpeg"),
        "classes": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
    }
    for name, valid in checks.items():
        if name not in marker:
            return f"it has no {name!r}"
        if not valid(marker[name]):
            return f"its {name!r} is {marker[name]!r}, not {_MARKER_FIELDS[name]}"
    return None


def _split_problem(split: Any, encoding: str, classes: int) -> str | None:
    """What is wrong with one split's entry of ``index.pt``, or ``None``."""
    if not isinstance(split, dict):
        return f"it is a {type(split).__name__}, not the dict sslplug prepare writes"
    for name in (*_INDEX_TENSORS, "files"):
        if name not in split:
            return f"it has no {name!r}"
    for name in _INDEX_TENSORS:
        value = split[name]
        if not isinstance(value, Tensor) or value.dtype != torch.int64:
            return f"its {name!r} is not an int64 tensor"
    files = split["files"]
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f and Path(f).name == f for f in files
    ):
        return f"its 'files' are {files!r}, not a list of file names in the folder"
    count = len(split["lengths"])
    if split["shapes"].shape != (count, 2):
        return f"its 'shapes' are {tuple(split['shapes'].shape)}, not ({count}, 2)"
    for name in ("offsets", "shard", "labels"):
        if split[name].shape != (count,):
            return f"its {name!r} are {tuple(split[name].shape)}, not ({count},)"
    if not count:
        return None
    if int(split["shard"].min()) < 0 or int(split["shard"].max()) >= len(files):
        return f"its images lie in shards up to {int(split['shard'].max())} of {len(files)} files"
    if int(split["offsets"].min()) < 0 or int(split["lengths"].min()) < 0:
        return "it places images at negative offsets or lengths"
    if int(split["shapes"].min()) < 1:
        return "it holds images of no pixels"
    if encoding == "raw" and not torch.equal(split["lengths"], split["shapes"].prod(dim=1) * 3):
        return "its raw images' lengths are not 3 x height x width bytes"
    labels = split["labels"]
    if classes and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        low, high = int(labels.min()), int(labels.max())
        return f"its labels run from {low} to {high}, not from 0 to {classes - 1}"
    return None


def read_store(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[ImageStore, Tensor]]]:
    """The marker of a prepared folder and, per split, its on-disk store and labels.

    Every part is checked before anything is read: a marker or an index that is not what
    ``write_store`` writes, or a shard file missing or shorter than the images its index places
    in it, is a ``DataError`` naming the file and saying to prepare the data again.
    """
    again = "Prepare the data again with sslplug prepare"
    marker_file, index_file = folder / STORE_MARKER, folder / "index.pt"
    try:
        marker = json.loads(marker_file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read the prepared data in {str(folder)!r}: {exc}. {again}"
        ) from None
    problem = _marker_problem(marker)
    if problem is not None:
        raise DataError(
            f"{str(marker_file)!r} is not the marker of prepared data: {problem}. {again}"
        )
    if marker.get("version") != STORE_VERSION:
        raise DataError(
            f"{str(folder)!r} was prepared in format version {marker.get('version')!r}; this "
            f"sslplug reads version {STORE_VERSION}: prepare the data again with sslplug prepare"
        )
    try:
        index = torch.load(index_file, weights_only=True)
    except Exception as exc:  # OSError, and whatever a damaged file makes torch.load raise
        raise DataError(
            f"cannot read the prepared data in {str(folder)!r}: {str(index_file)!r} is "
            f"unreadable ({type(exc).__name__}: {str(exc)[:200]}). {again}"
        ) from None
    if not isinstance(index, dict) or "train" not in index:
        what = "no 'train' split" if isinstance(index, dict) else f"a {type(index).__name__}"
        raise DataError(
            f"{str(index_file)!r} is not the index of prepared data: it holds {what}. {again}"
        )
    splits = {}
    for name, v in index.items():
        problem = _split_problem(v, marker["encoding"], len(marker["classes"]))
        if problem is not None:
            raise DataError(
                f"{str(index_file)!r} is not the index of prepared data: its split {name!r}: "
                f"{problem}. {again}"
            )
        store = ImageStore(
            v["shapes"], v["offsets"], v["lengths"], v["shard"],
            [str(folder / f) for f in v["files"]], marker["encoding"],
        )
        for path, needed in zip(store.shards, store.shard_ends()):
            _file_size(path, needed)
        splits[name] = (store, v["labels"])
    return marker, splits
