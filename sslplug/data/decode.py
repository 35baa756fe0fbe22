"""Decoding images at a resolution of their own, and laying them out in batches.

A folder of photos is not squashed into squares of the crop size before augmentation (a small
crop of such a square is an upsampled blur). Each image is decoded once, turned upright by its
EXIF orientation, its longer side cut to at most ``MAX_ASPECT`` times the shorter, and shrunk
(never enlarged) so that its shorter side is at most ``ceil(store_scale * image_size)``, as the
fast ImageNet loaders keep images (FFCV stores ImageNet at a bounded side for the same reason).
Random resized crops are then taken from these pixels on the device (``sslplug.data.crops``).

Images of their own sizes travel as a padded canvas and their extents (``pad_batch``); decoded
in DataLoader workers, a batch travels packed in a few tensors (``pack``), whatever its size.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sslplug.errors import DataError

__all__ = [
    "MAX_ASPECT",
    "decode_all",
    "decode_image",
    "decode_jpegs",
    "decoded",
    "needed_extents",
    "pack",
    "packed_batches",
    "pad_batch",
    "stored_side",
    "unpack",
]

log = logging.getLogger(__name__)

MAX_ASPECT = 3.0  # longer side at most 3x the shorter: panoramas are centre-cut to this


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
    on the canvas, and 1 where it was transposed (``sslplug.data.crops`` turns its crops back).
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



def needed_extents(images: Tensor, extents: Tensor) -> Tensor | None:
    """``extents``, or ``None`` when every image fills the canvas upright (nothing to avoid
    or to turn back)."""
    full = torch.tensor([*images.shape[-2:], 0], dtype=extents.dtype)
    return None if bool((extents == full).all()) else extents


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



def decoded(
    decode: Any, what: str, strict: bool, remedy: str, logged: str = ""
) -> Tensor | None:
    """``decode()``, or, when it fails, ``None`` with a warning about ``logged`` (default
    ``what``), or with ``data.strict`` a ``DataError`` naming ``what``: the one rule for
    unreadable images of folders and shards."""
    try:
        return decode()
    except Exception as exc:
        if strict:
            raise DataError(f"cannot read {what}: {exc}. {remedy}") from None
        log.warning("skipping unreadable %s: %s", logged or what, exc)
        return None


def pack(
    items: list[tuple[Tensor, int] | None],
) -> tuple[Tensor, Tensor, Tensor, int]:
    """A batch of decoded items as few tensors: the readable images' pixels one after another
    (uint8, 1-D), their heights and widths ``(n, 2)``, their labels, and how many items were
    unreadable.

    A DataLoader worker hands each tensor it returns to the main process through a
    shared-memory file descriptor that stays open while the tensor lives; images returned one
    tensor each would hold one descriptor per image, and a folder of more images than the
    process may open files would end in "received 0 items of ancdata". Packed, a batch is
    three descriptors, whatever its size.
    """
    good = [item for item in items if item is not None]
    pixels = (
        torch.cat([image.reshape(-1) for image, _ in good])
        if good
        else torch.empty(0, dtype=torch.uint8)
    )
    shapes = torch.tensor([image.shape[-2:] for image, _ in good], dtype=torch.int64).view(-1, 2)
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return pixels, shapes, labels, len(items) - len(good)


def unpack(pixels: Tensor, shapes: Tensor) -> Iterator[Tensor]:
    """The images of a packed batch (``pack``), uint8 ``(3, h, w)`` views of ``pixels``."""
    offset = 0
    for height, width in shapes.tolist():
        length = 3 * height * width
        yield pixels[offset : offset + length].view(3, height, width)
        offset += length


def packed_batches(
    source: Dataset, workers: int, batch_size: int = 64
) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
    """``source`` decoded in ``workers`` processes, a packed batch (``pack``) at a time."""
    loader = DataLoader(source, batch_size=batch_size, num_workers=workers, collate_fn=pack)
    yield from loader


def decode_all(source: Dataset, workers: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Every image of ``source``, decoded in ``workers`` processes, packed (``pack``): their
    pixels one after another, their shapes, their labels, and how many could not be read.

    Each batch is copied out of the worker's shared memory as it arrives (releasing its file
    descriptors), so no limit on open files bounds the size of the data set.
    """
    pixels: list[Tensor] = []
    shapes: list[Tensor] = []
    labels: list[Tensor] = []
    skipped = 0
    for batch_pixels, batch_shapes, batch_labels, unreadable in packed_batches(source, workers):
        pixels.append(batch_pixels.clone() if workers else batch_pixels)
        shapes.append(batch_shapes.clone())
        labels.append(batch_labels.clone())
        skipped += unreadable
    if not pixels:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, dtype=torch.uint8), empty.view(0, 2), empty, skipped
    return torch.cat(pixels), torch.cat(shapes), torch.cat(labels), skipped
