"""Writing the prepared form of a data set: ``sslplug prepare DATA OUT``.

The images of DATA are decoded once (``data.workers`` processes), at their stored resolution
(``sslplug.data.decode``), and written to OUT as shard files of raw pixels or JPEG bytes, an
``index.pt`` and the marker file that ``load_data`` recognises (``sslplug.data.store``). OUT is
written as ``OUT.partial``, locked for the writing process, and renamed into place once whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image
from torch import Tensor

from sslplug.checkpoint import write_failure
from sslplug.config import DataSettings
from sslplug.data.decode import packed_batches, stored_side, unpack
from sslplug.data.sources import SOURCES, load_data
from sslplug.data.split import Split
from sslplug.data.store import SHARD_BYTES, STORE_MARKER, STORE_VERSION, Encoding, ImageStore
from sslplug.errors import DataError, OutputError
from sslplug.outputs import check_name_lengths, check_outside_data

__all__ = ["PREPARE_LOCK", "check_prepare_out", "prepare", "write_store"]

log = logging.getLogger(__name__)


def prepare(
    settings: DataSettings, out: Path, encoding: Encoding = "raw", seed: int = 0
) -> dict[str, Any]:
    """Write the data ``settings`` names (a folder, shards, or a built-in data set) to ``out``
    in the prepared form (``write_store``), decoding in ``data.workers``
    processes; returns what the marker file records, with ``skipped`` images added.

    The splits are the ones a run would use (a labelled folder without ``test/`` holds out
    ``data.test_fraction`` with ``seed``), so a run on ``out`` sees the same train and test
    images as one on the source.
    """
    data = load_data(attrs.evolve(settings, cache_gb=0.0), seed)
    if isinstance(data.train.store, ImageStore):
        raise DataError(f"{settings.name!r} is prepared data already; give its source")
    skipped: list[int] = []

    def items(split: Split) -> Iterator[tuple[Tensor, int]]:
        if split.images is not None:
            yield from zip(split.images, split.labels.tolist())
            return
        assert split.source is not None  # load_data with cache_gb=0 streams every split
        for pixels, shapes, labels, unreadable in packed_batches(split.source, settings.workers):
            skipped.append(unreadable)
            yield from zip(unpack(pixels, shapes), labels.tolist())

    splits = {"train": data.train} | ({"test": data.test} if data.test is not None else {})
    marker = write_store(
        out,
        {name: items(split) for name, split in splits.items()},
        image_size=data.image_size,
        store_scale=settings.store_scale,
        classes=data.classes,
        encoding=encoding,
        source=settings.name,
    )
    return marker | {"skipped": sum(skipped) + data.skipped}


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
    if source not in SOURCES:
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
        index = _write_splits(partial, splits, encoding)
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


def _write_splits(
    partial: Path, splits: dict[str, Iterable[tuple[Tensor, int]]], encoding: Encoding
) -> dict[str, Any]:
    """Write the shard files of every split in ``partial``; returns the index of each split."""
    index: dict[str, Any] = {}
    for name, items in splits.items():
        writer = _SplitWriter(partial, name, encoding)
        for image, label in items:
            with _writing(partial):
                writer.add(image, label)
        with _writing(partial):
            index[name] = writer.close()
    return index


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
        _lock_left(fd, said, partial, out)
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


def _lock_left(fd: int, said: str, partial: Path, out: Path) -> None:
    """Lock the ``PREPARE_LOCK`` of ``partial`` (open as ``fd``, saying ``said``), or raise
    ``OutputError``: naming the prepare that holds it, or saying why it cannot be locked."""
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


def _holder() -> str:
    """Who this process is, for a lock file: pid, host, start time and command."""
    return (
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(sys.argv)}"
    )

