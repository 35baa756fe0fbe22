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

import contextlib
import errno
import fcntl
import functools
import io
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sslplug.checkpoint import write_failure
from sslplug.errors import DataError, OutputError
from sslplug.outputs import check_name_lengths, check_outside_data

__all__ = [
    "MAX_ASPECT",
    "PREPARE_LOCK",
    "STORE_MARKER",
    "ImageStore",
    "check_prepare_out",
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


# In OUT.partial while ``sslplug prepare`` writes there: says so (who, since when) and carries
# an ``flock`` lock while that process lives. The kernel drops the lock when the process ends,
# ``kill -9`` included, so a folder whose marker is free was left by an interrupted prepare.
PREPARE_LOCK = ".sslplug-prepare"
_PREPARE_HEADER = "sslplug prepare in progress"
# the names prepare writes in OUT.partial: any other there is not ours to delete
_PREPARE_FILES = re.compile(r"[a-z]+-\d{5}\.bin|index\.pt|" + re.escape(STORE_MARKER))
_PARTIAL = ".partial"


def check_prepare_out(out: str | Path, source: str) -> None:
    """Refuse, before any work, an ``OUT`` that ``sslplug prepare`` cannot write the data
    ``source`` names to: a file or a path under one, the current folder or one above it, a
    folder that is not empty, a name too long for its file system (with ``.partial`` added),
    or the data folder itself or a folder inside it. Raises ``OutputError`` (``DataError`` for
    a folder that holds something) naming ``OUT`` and saying what to give instead."""
    from sslplug.data import BUILTIN  # sslplug.data imports this module

    out = Path(out)
    check_name_lengths(
        out, "OUT", len(_PARTIAL),
        f" (prepare writes it first as OUT{_PARTIAL}, {len(_PARTIAL)} bytes longer)",
    )
    example = f"{Path(source).name or 'data'}-prepared"
    where = out.expanduser().resolve()
    if out.name in ("", ".", "..") or where in (Path.cwd(), *Path.cwd().parents):
        raise OutputError(
            f"OUT {str(out)!r} is {str(where)!r}, the current folder or one above it: prepare "
            f"writes a new folder and puts it in OUT's place; give the name of a new folder, "
            f"such as {example!r}"
        )
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker == out:
        raise OutputError(
            f"OUT {str(out)!r} is a file, not a folder; give a new folder for the prepared "
            f"data, such as {example!r}"
        )
    if blocker is not None:
        raise OutputError(
            f"cannot create OUT {str(out)!r}: {str(blocker)!r} is a file, not a folder; give "
            f"a path under a folder"
        )
    if source not in BUILTIN:
        check_outside_data(out, source, "OUT", "DATA")
    try:
        full = out.is_dir() and any(out.iterdir())
    except OSError as exc:
        raise OutputError(f"cannot read OUT {str(out)!r}: {write_failure(exc)}") from None
    if full:
        raise DataError(
            f"{str(out)!r} exists and is not empty: give a new folder for the prepared data"
        )


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
    that a folder without the marker is an unfinished one. Returns the marker's content.

    The files are written in ``OUT.partial``, locked for this process (``PREPARE_LOCK``), which
    is renamed to ``out`` once complete: a second prepare into ``out`` meanwhile is refused,
    naming this one. An ``OUT.partial`` that an interrupted prepare left behind is removed; any
    other (the user's own) is refused, never deleted. When writing fails, ``OUT.partial`` is
    removed and ``OutputError`` says why."""
    check_prepare_out(out, source)
    partial, lock = _claim_partial(out)
    try:
        check_prepare_out(out, source)  # a prepare that just ended may have filled it
        index: dict[str, Any] = {}
        for name, items in splits.items():
            writer = _SplitWriter(partial, name, encoding)
            for image, label in items:
                with _writing(partial):
                    writer.add(image, label)
            with _writing(partial):
                index[name] = writer.close()
        if not len(index.get("train", {}).get("lengths", ())):
            raise DataError(
                f"none of the training images of {source!r} could be read, so there is nothing "
                f"to prepare (the log names the unreadable files); nothing is kept"
            )
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
        buffer = io.BytesIO()  # in memory first, so that a failed write is an OSError
        torch.save(index, buffer)
        with _writing(partial):
            (partial / "index.pt").write_bytes(buffer.getvalue())
            (partial / STORE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if out.exists():
                out.rmdir()
            partial.rename(out)
        with contextlib.suppress(OSError):  # while still holding it: see _claim_partial
            (out / PREPARE_LOCK).unlink()
        return marker
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours: nothing half-written is left
        raise
    finally:
        os.close(lock)


@contextlib.contextmanager
def _writing(partial: Path) -> Iterator[None]:
    """Turn a failed write in ``partial`` into an ``OutputError`` saying why."""
    try:
        yield
    except OSError as exc:
        raise OutputError(
            f"could not write the prepared data in {str(partial)!r}: {write_failure(exc)}; "
            f"nothing is kept (the unfinished folder is removed): make room or give another OUT"
        ) from None


def _claim_partial(out: Path) -> tuple[Path, int]:
    """Create ``OUT.partial`` holding ``PREPARE_LOCK``, locked by this process; returns the
    folder and the lock file's descriptor (the lock lasts until it is closed). The folder is
    made under a name of its own and renamed into place with its lock already taken, so that
    no other prepare ever sees it without one. An ``OUT.partial`` already there is removed
    when an interrupted prepare left it (``_remove_stale``); otherwise an ``OutputError``
    names it."""
    partial = out.with_name(out.name + _PARTIAL)
    while True:
        if partial.exists() or partial.is_symlink():
            _remove_stale(partial, out)
            continue
        fresh = out.parent / f".sslplug-prepare.{secrets.token_hex(4)}.tmp"
        with _writing(partial):
            fresh.mkdir(parents=True)
        try:
            fd = os.open(fresh / PREPARE_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
            os.write(fd, f"{_PREPARE_HEADER}: {_holder()}\n".encode())
        except OSError as exc:
            shutil.rmtree(fresh, ignore_errors=True)
            raise OutputError(
                f"cannot lock {str(fresh / PREPARE_LOCK)!r}: {write_failure(exc)}; give an OUT "
                f"on a local file system"
            ) from None
        try:
            fresh.rename(partial)  # refused when another prepare made OUT.partial meanwhile
        except OSError as exc:
            os.close(fd)
            shutil.rmtree(fresh, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                continue
            raise OutputError(
                f"could not create {str(partial)!r}: {write_failure(exc)}; give another OUT"
            ) from None
        return partial, fd


def _remove_stale(partial: Path, out: Path) -> None:
    """Remove ``partial`` when a prepare that was interrupted left it: it holds our
    ``PREPARE_LOCK``, which no live process holds, and only files prepare writes. Otherwise
    raise ``OutputError``: another prepare is writing it (naming that process), or it is not
    ours to delete. Returns also when another process removed it meanwhile."""
    not_ours = (
        f"{str(partial)!r} exists and is not a folder that an interrupted sslplug prepare left "
        f"behind ({{why}}); it may be yours, so it is left as it is: move it aside, or give "
        f"another OUT"
    )
    if partial.is_symlink() or not partial.is_dir():
        raise OutputError(not_ours.format(why="it is not a folder"))
    try:
        fd = os.open(partial / PREPARE_LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not partial.exists():
            return  # removed meanwhile, by the prepare that left it or by a stale one's
        raise OutputError(not_ours.format(why=f"it has no {PREPARE_LOCK}")) from None
    except OSError as exc:
        raise OutputError(
            not_ours.format(why=f"its {PREPARE_LOCK} cannot be opened: {write_failure(exc)}")
        ) from None
    try:
        said = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if not said.startswith(_PREPARE_HEADER):
            raise OutputError(not_ours.format(why=f"its {PREPARE_LOCK} is not sslplug's"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = said.removeprefix(_PREPARE_HEADER).lstrip(": ")
            raise OutputError(
                f"another sslplug prepare is writing {str(out)!r} ({holder}); wait for it to end "
                f"or stop it, or give another OUT"
            ) from None
        except OSError as exc:
            raise OutputError(
                f"cannot lock {str(partial / PREPARE_LOCK)!r}: {write_failure(exc)}"
            ) from None
        if not partial.exists():
            return  # removed by the prepare that held the lock before us
        strangers = sorted(
            entry.name
            for entry in partial.iterdir()
            if entry.name != PREPARE_LOCK and not _PREPARE_FILES.fullmatch(entry.name)
        )
        if strangers:
            raise OutputError(
                not_ours.format(why=f"it holds {strangers[0]!r}, which prepare does not write")
            )
        trash = partial.with_name(f".sslplug-prepare.{secrets.token_hex(4)}.stale")
        partial.rename(trash)  # at once: no other prepare sees it half removed
        shutil.rmtree(trash, ignore_errors=True)
        log.warning(
            "removed %s, which an interrupted sslplug prepare left behind (%s)",
            partial,
            said.removeprefix(_PREPARE_HEADER).lstrip(": "),
        )
    except OSError as exc:
        raise OutputError(
            f"could not remove {str(partial)!r}, left by an interrupted sslplug prepare: "
            f"{write_failure(exc)}; remove it yourself"
        ) from None
    finally:
        os.close(fd)


def _holder() -> str:
    """Who this process is, for a lock file: pid, host, start time and command."""
    return (
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(sys.argv)}"
    )


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
