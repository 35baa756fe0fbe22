"""Checkpoints: written atomically, read with ``weights_only=True`` so a file can never run code.

A checkpoint is a dict of tensors and plain data holding everything needed to continue a run:
the state of every component (view generator, encoder, loss, target update), the optimizer and
schedule, the step and epoch, the random-number states and the settings. It is written to a
temporary file in the same folder and renamed over the old one, so a crash while writing leaves
the previous checkpoint intact.

Every checkpoint carries its format's version. Version 2 holds every key the run writes today
(``docs/hooks.md`` lists them); version 1 is the same layout, except that files written by
earlier releases may lack some keys. ``load_checkpoint`` reads both and hands back version 2:
``migrate`` fills in, from what a version 1 file holds, the keys it may lack, so that no reader
of checkpoints needs to know an older layout. A version this sslplug does not know (one written
by a newer sslplug) is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from sslplug.errors import CheckpointError

__all__ = [
    "FORMAT",
    "READABLE_VERSIONS",
    "VERSION",
    "CheckpointWriteError",
    "is_checkpoint_file",
    "load_checkpoint",
    "migrate",
    "save_checkpoint",
    "write_failure",
]

FORMAT = "sslplug-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # load_checkpoint migrates the older ones to VERSION
FILENAME = "last.pt"


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (a full disk, a file size limit, no permission); the
    file at the path, if any, is left as it was."""


# What an error number means for someone whose file could not be written, where the system's
# own words ("File too large") could mislead; the others ("Permission denied") say it already.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file size limit was reached (see `ulimit -f`)",
}


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in words, from an ``OSError`` or from the exception torch raises
    around one (``RuntimeError: enforce fail at inline_container.cc``, with the ``OSError`` as
    its context)."""
    cause: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; the bound only guards against a cycle
        if cause is None or isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = cause.strerror or str(cause)
    meaning = _WRITE_FAILURES.get(cause.errno or 0)
    return f"{meaning} ({detail})" if meaning else detail


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (plus the format marker) to ``path`` atomically: into a temporary file
    ``.NAME.XXXXXXXX.tmp`` beside it, then renamed over it. When the write fails, the temporary
    file is removed, ``path`` is left as it was, and ``CheckpointWriteError`` says why."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError | RuntimeError):
            raise CheckpointWriteError(
                f"could not write the checkpoint {str(path)!r}: {write_failure(exc)}"
            ) from exc
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``.

    ``path`` may be a run folder, whose ``last.pt`` is read. Raises ``CheckpointError`` for a
    missing or unreadable file, one that is not a checkpoint, a truncated one, one holding
    objects that are not plain data, or one of another format. The message never repeats
    torch's advice to load with ``weights_only=False``: for a file of unknown origin that would
    mean running whatever code it holds.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}: give a run folder that holds {FILENAME} or a "
            f"checkpoint file written by sslplug"
        )
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused what the file holds
        raise CheckpointError(_refused_content(path, exc)) from None
    except Exception as exc:  # a damaged archive makes torch raise almost anything
        raise CheckpointError(
            f"{str(path)!r} is not a readable sslplug checkpoint: it is a zip archive, but not "
            f"one that torch.save wrote, or its contents are damaged ({_torch_reason(exc)}); "
            f"check the path, or copy the file again from where it came from"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is a PyTorch file but not an sslplug checkpoint (no "
            f"'format': {FORMAT!r} entry)"
        )
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > VERSION
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {version!r}; this sslplug reads versions "
            f"{_versions()}"
            + ("; a newer sslplug wrote it: upgrade sslplug to read it" if newer else "")
        )
    return migrate(state)


def _versions() -> str:
    """``READABLE_VERSIONS`` in words: "1 and 2"."""
    *first, last = (str(version) for version in READABLE_VERSIONS)
    return f"{', '.join(first)} and {last}" if first else last


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an older version as version ``VERSION`` writes it (a new dict; ``state``
    itself is left as it was). The one step, version 1 to 2, adds the keys that files written
    before they were saved lack, with what they held then:

    - ``views``: ``None``, the view generator's state was not saved (it starts fresh);
    - ``history``: no finished epochs recorded;
    - ``baseline``: the kNN accuracy of the random initialisation (``knn_baseline``) alone;
    - ``init_rng``: ``None``, the components were built from the run's seed;
    - ``epoch_loss_sum``: 0, written at the end of an epoch;
    - ``rng_per_rank``: none, rank 0's ``rng`` alone;
    - ``batch_size``: that of the saved settings, ``None`` without them;
    - ``steps_per_epoch``: told by the step and the epoch when the file ends an epoch,
      otherwise ``None`` (not known: a resume cannot check it).
    """
    state = dict(state)
    if state.get("version") == 1:
        at_epoch_end = not state.get("epoch_loss_sum")  # no loss of an unfinished epoch saved
        epoch, step = int(state.get("epoch", 0)), int(state.get("step", 0))
        if state.get("steps_per_epoch") is None:
            told = epoch > 0 and at_epoch_end and step % epoch == 0
            state["steps_per_epoch"] = step // epoch if told else None
        if "batch_size" not in state:
            saved_train = (state.get("settings") or {}).get("train", {})
            state["batch_size"] = saved_train.get("batch_size")
        if state.get("baseline") is None:
            knn = state.get("knn_baseline")
            state["baseline"] = {"knn_top1": knn} if knn is not None else {}
        state.setdefault("views", None)
        state.setdefault("history", [])
        state.setdefault("init_rng", None)
        state.setdefault("epoch_loss_sum", 0.0)
        state["rng_per_rank"] = state.get("rng_per_rank") or []
        state["version"] = 2
    return state


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive, which starts with these bytes
# save_checkpoint puts the marker first in the archive's first member, within its first bytes
_HEAD_BYTES = 4096


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that ``save_checkpoint`` wrote, whole or cut short.

    Cheap: it reads the first few KiB, where every checkpoint holds its format marker. For
    code that writes files and must never replace a checkpoint.
    """
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return False
    return head.startswith(_ZIP_MAGIC) and FORMAT.encode() in head


def _check_archive(path: Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` can be read and is a whole zip archive: say
    when it is another kind of file, and when it is truncated."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(
            f"cannot read the checkpoint {str(path)!r}: {exc.strerror or exc}; check its "
            f"permissions (sslplug only needs to read it)"
        ) from None
    if head and not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(
            f"{str(path)!r} is not a readable sslplug checkpoint: it is not a zip archive, as "
            f"every file that torch.save writes is, so sslplug did not write it; it is another "
            f"kind of file, or came from an untrusted source. Check the path"
        )
    try:
        with zipfile.ZipFile(path):
            return
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass  # a zip archive's index is at its end: without it, the file was cut short
    kind = "an sslplug checkpoint" if FORMAT.encode() in head else "a PyTorch file"
    cut = f"truncated ({size} bytes of {kind}, without its end)" if head else "empty (0 bytes)"
    temporary = re.fullmatch(r"\.(.+)\.\w+\.tmp", path.name)  # as save_checkpoint names them
    if temporary:
        final = path.with_name(temporary.group(1))
        kept = (
            f"the checkpoint it was to replace, {str(final)!r}, is untouched: use that one"
            if final.is_file()
            else f"no complete {final.name} was written beside it"
        )
        raise CheckpointError(
            f"{str(path)!r} is not a readable sslplug checkpoint: it is the temporary file of a "
            f"checkpoint write that was cut short (the process was killed) and is incomplete "
            f"({size} bytes); {kept}"
        )
    raise CheckpointError(
        f"{str(path)!r} is not a readable sslplug checkpoint: it is {cut}, an incomplete "
        f"file such as a copy or download that stopped early, or a disk that filled during a "
        f"copy, leaves behind. sslplug replaces a checkpoint only with a complete one, so this "
        f"file was cut short after sslplug wrote it, and sslplug keeps no earlier checkpoint: "
        f"the previous one is gone. Copy the file again from where it came from, or start the "
        f"run again"
    )


def _refused_content(path: Path, exc: pickle.UnpicklingError) -> str:
    """What to say when ``torch.load(weights_only=True)`` refuses what a file holds."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return (
            f"{str(path)!r} is not a readable sslplug checkpoint: it holds an object that "
            f"needs {refused.group(1)} (a class or function, not plain data), and sslplug "
            f"reads checkpoints as plain data only (tensors, "
            f"numbers, strings, lists, dicts), so that opening a file can never run code. If a "
            f"run of yours wrote it, one of its components keeps such an object in its state "
            f"(its state_dict, or a module's get_extra_state): components must keep plain data "
            f"there, and rebuild their objects from it in load_state_dict or set_extra_state. "
            f"Otherwise the file was not written by sslplug, or comes from an untrusted source"
        )
    return (
        f"{str(path)!r} is not a readable sslplug checkpoint: it holds data that is not plain "
        f"tensors and numbers ({_torch_reason(exc)}), so sslplug did not write it; it is another "
        f"kind of file, or came from an untrusted source, and sslplug will not open it in a way "
        f"that could run code"
    )


# sentences of torch's messages to leave out: advice to load an untrusted file in a way that can
# run its code, and requests to report the error to PyTorch
_UNSAFE_ADVICE = re.compile(
    r"weights_only|safe_globals|trust|arbitrary code|file an issue|report an enhancement|"
    r"Could this error message|internal miniz error|If you are seeing this error|This can happen",
    re.IGNORECASE,
)


def _torch_reason(exc: BaseException) -> str:
    """The first plain sentence of a torch loading error, without its advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # terminal colours
    text = text.split("WeightsUnpickler error:", 1)[-1]
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text))
    kept = [s for s in sentences if s and not _UNSAFE_ADVICE.search(s)]
    return kept[0].rstrip(".") if kept else type(exc).__name__
