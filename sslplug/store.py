"""Images kept at a resolution of their own: decoding, the stored form, and ``sslplug prepare``.

A folder of photos is not squashed into squares of the crop size before augmentation (a small
crop of such a square is an upsampled blur). Each image is decoded once, turned upright by its
EXIF orientation, its longer side cut to at most ``MAX_ASPECT`` times the shorter, and shrunk
(never enlarged) so that its shorter side is at most ``ceil(store_scale * image_size)``, as the
fast ImageNet loaders keep images (FFCV stores ImageNet at a bounded side for the same reason).
Random resized crops are then taken from these pixels on the device (``sslplug.crops``).

An ``ImageStore`` holds such images one after another as uint8 ``(3, h, w)`` pixels (``raw``)
or as JPEG bytes re-encoded at the stored size (``jpeg``, about six times smaller; decoded with
TorchCodec when installed, whose CUDA decoder takes a whole batch in one nvJPEG call), in memory
or in shard files on disk read with ``os.pread`` (bounded host memory: a batch at a time).
``sslplug prepare DATA OUT`` writes the on-disk form once (``prepare``); ``--data OUT`` then
streams it.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sslplug.errors import DataError

__all__ = [
    "MAX_ASPECT",
    "STORE_MARKER",
    "ImageStore",
    "decode_image",
    "decode_jpegs",
    "pad_batch",
    "stored_side",
    "write_store",
]

log = logging.getLogger(__name__)

MAX_ASPECT = 3.0  # longer side at most 3x the shorter: panoramas are centre-cut to this
STORE_MARKER = "sslplug-data.json"
STORE_VERSION = 1
SHARD_BYTES = 1 << 30
Encoding = Literal["raw", "jpeg"]


def stored_side(image_size: int, store_scale: float) -> int:
    """The bound on a stored image's shorter side for crops of ``image_size``."""
    return math.ceil(store_scale * image_size)


def _stored_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    scale = min(1.0, short_side / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_image(source: Path | str | bytes, short_side: int = 0) -> Tensor:
    """Decode an image file (or its bytes) to uint8 RGB ``(3, h, w)``, upright.

    The EXIF orientation is applied; grayscale, palette, alpha and 16-bit images become RGB; the
    longer side is centre-cut to ``MAX_ASPECT`` times the shorter; with ``short_side`` > 0 the
    image is shrunk (antialiased) so that its shorter side is at most that. A JPEG larger than
    needed is decoded at a reduced scale (libjpeg's DCT scaling through PIL's ``draft``), which
    is several times faster than decoding it whole and then shrinking it.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(stream) as pil:
        if short_side and pil.format == "JPEG":
            height, width = _stored_shape(pil.height, pil.width, short_side)
            pil.draft("RGB", (width, height))
        pil = ImageOps.exif_transpose(pil)
        if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
            pil = pil.point(lambda v: v / 256).convert("L")
        elif pil.mode == "F":
            pil = pil.convert("L")
        rgb = pil.convert("RGB")
    width, height = rgb.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        long_side = int(MAX_ASPECT * min(width, height))
        left = (width - long_side) // 2 if width > height else 0
        top = (height - long_side) // 2 if height > width else 0
        rgb = rgb.crop((left, top, left + min(width, long_side), top + min(height, long_side)))
        width, height = rgb.size
    if short_side and min(width, height) > short_side:
        height, width = _stored_shape(height, width, short_side)
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return array.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def pad_batch(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Images of their own sizes as one uint8 canvas ``(B, 3, H, W)`` and their extents.

    Portrait images are laid on their side (transposed), so that a batch of portrait and
    landscape photos needs a canvas of about the longer side by the shorter, not a square of
    the longer side. Each image sits in the top-left corner; the rest of its row and column is
    filled with its last column and row (edge replication), so that a crop touching its border
    never blends in pixels of the padding. ``extents`` ``(B, 3)``: each image's height and width
    on the canvas, and 1 where it was transposed (``sslplug.crops`` turns its crops back).
    """
    turned = [image.shape[-2] > image.shape[-1] for image in images]
    laid = [image.transpose(-1, -2) if t else image for image, t in zip(images, turned)]
    extents = torch.tensor(
        [[*image.shape[-2:], int(t)] for image, t in zip(laid, turned)], dtype=torch.int64
    ).view(-1, 3)
    height, width = (int(v) for v in extents[:, :2].max(dim=0).values)
    device = images[0].device if len(images) else None
    canvas = torch.empty(len(images), 3, height, width, dtype=torch.uint8, device=device)
    for slot, image in zip(canvas, laid):
        h, w = image.shape[-2:]
        slot[:, :h, :w] = image
        if w < width:
            slot[:, :h, w:] = image[:, :, w - 1 : w]
        if h < height:
            slot[:, h:, :] = slot[:, h - 1 : h, :]
    return canvas, extents


@functools.cache
def _torchcodec_jpeg() -> Callable[..., Any] | None:
    """TorchCodec's ``decode_jpeg``, or ``None`` where it is not installed or does not load
    beside this torch (its binary is built for one torch release)."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception as exc:  # ImportError, or its library failing to load
        log.debug("TorchCodec unavailable (%s): JPEG bytes are decoded with PIL", exc)
        return None
    return decode_jpeg


def decode_jpegs(encoded: list[Tensor], device: torch.device | None = None) -> list[Tensor]:
    """Decode JPEG bytes (1-D uint8 tensors on the CPU) with TorchCodec when it loads, else
    PIL. On a CUDA ``device`` TorchCodec decodes the whole list in one nvJPEG call and the
    images are on the device; elsewhere they are on the CPU."""
    decode_jpeg = _torchcodec_jpeg()
    if decode_jpeg is None:
        return [decode_image(bytes(e.numpy())) for e in encoded]
    if device is not None and device.type == "cuda":
        return list(decode_jpeg(encoded, device=device))
    return list(decode_jpeg(encoded))


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

    def in_memory(self) -> ImageStore:
        """This store with every shard read into memory."""
        if not self.on_disk:
            return self
        shards = [torch.from_file(str(p), size=os.path.getsize(p), dtype=torch.uint8)
                  for p in self.shards]
        return ImageStore(self.shapes, self.offsets, self.lengths, self.shard, shards,
                          self.encoding)

    @classmethod
    def from_images(cls, images: Sequence[Tensor]) -> ImageStore:
        """An in-memory raw store of uint8 ``(3, h, w)`` images."""
        shapes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.int64)
        lengths = shapes.prod(dim=1) * 3
        offsets = torch.cumsum(lengths, 0) - lengths
        flat = torch.cat([image.reshape(-1) for image in images]) if images else torch.empty(0)
        return cls(shapes, offsets, lengths, torch.zeros(len(images), dtype=torch.int64),
                   [flat.to(torch.uint8)])


# ------------------------------------------------------------------------------------------
# the on-disk form


def _encode(image: Tensor, encoding: Encoding) -> bytes:
    if encoding == "raw":
        return image.contiguous().numpy().tobytes()
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@attrs.define
class _SplitWriter:
    """Appends the images of one split to shard files of at most ``SHARD_BYTES``."""

    folder: Path
    split: str
    encoding: Encoding
    shapes: list[tuple[int, int]] = attrs.field(factory=list)
    offsets: list[int] = attrs.field(factory=list)
    lengths: list[int] = attrs.field(factory=list)
    shard: list[int] = attrs.field(factory=list)
    labels: list[int] = attrs.field(factory=list)
    files: list[str] = attrs.field(factory=list)
    _handle: Any = None
    _written: int = 0

    def add(self, image: Tensor, label: int) -> None:
        data = _encode(image, self.encoding)
        if self._handle is None or self._written + len(data) > SHARD_BYTES:
            self._next_shard()
        self.shapes.append((int(image.shape[-2]), int(image.shape[-1])))
        self.offsets.append(self._written)
        self.lengths.append(len(data))
        self.shard.append(len(self.files) - 1)
        self.labels.append(int(label))
        self._handle.write(data)
        self._written += len(data)

    def _next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._handle = open(self.folder / name, "wb")  # noqa: SIM115 - closed in close()
        self._written = 0

    def close(self) -> dict[str, Any]:
        if self._handle is not None:
            self._handle.close()
        return {
            "shapes": torch.tensor(self.shapes, dtype=torch.int64).view(-1, 2),
            "offsets": torch.tensor(self.offsets, dtype=torch.int64),
            "lengths": torch.tensor(self.lengths, dtype=torch.int64),
            "shard": torch.tensor(self.shard, dtype=torch.int64),
            "labels": torch.tensor(self.labels, dtype=torch.int64),
            "files": self.files,
        }


def write_store(
    out: Path,
    splits: dict[str, Iterable[tuple[Tensor, int]]],
    *,
    image_size: int,
    store_scale: float,
    classes: Sequence[str],
    encoding: Encoding,
    source: str,
) -> dict[str, Any]:
    """Write the prepared form of ``splits`` (each an iterable of ``(image, label)``) to
    ``out``: shard files, ``index.pt``, and the marker ``sslplug-data.json`` written last, so
    that a folder without the marker is an unfinished one. Returns the marker's content."""
    if out.exists() and any(out.iterdir()):
        raise DataError(
            f"{str(out)!r} exists and is not empty: give a new folder for the prepared data"
        )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    index: dict[str, Any] = {}
    for name, items in splits.items():
        writer = _SplitWriter(partial, name, encoding)
        for image, label in items:
            writer.add(image, label)
        index[name] = writer.close()
    torch.save(index, partial / "index.pt")
    marker = {
        "format": "sslplug-prepared",
        "version": STORE_VERSION,
        "source": source,
        "image_size": image_size,
        "store_scale": store_scale,
        "short_side": stored_side(image_size, store_scale),
        "encoding": encoding,
        "classes": list(classes),
        "splits": {
            name: {"images": len(v["lengths"]), "bytes": int(v["lengths"].sum())}
            for name, v in index.items()
        },
    }
    (partial / STORE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return marker


def read_store(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[ImageStore, Tensor]]]:
    """The marker of a prepared folder and, per split, its on-disk store and labels."""
    try:
        marker = json.loads((folder / STORE_MARKER).read_text())
        index = torch.load(folder / "index.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"cannot read the prepared data in {str(folder)!r}: {exc}. Prepare it again with "
            f"sslplug prepare"
        ) from None
    if marker.get("version") != STORE_VERSION:
        raise DataError(
            f"{str(folder)!r} was prepared in format version {marker.get('version')!r}; this "
            f"sslplug reads version {STORE_VERSION}: prepare the data again with sslplug prepare"
        )
    splits = {}
    for name, v in index.items():
        store = ImageStore(
            v["shapes"], v["offsets"], v["lengths"], v["shard"],
            [str(folder / f) for f in v["files"]], marker["encoding"],
        )
        splits[name] = (store, v["labels"])
    return marker, splits
