"""Checkpoints: written atomically, read with ``weights_only=True`` so a file can never run code.

A checkpoint is a dict of tensors and plain data holding everything needed to continue a run:
the state of every component (view generator, encoder, loss, target update), the optimizer and
schedule, the step and epoch, the random-number states and the settings. It is written to a
temporary file in the same folder and renamed over the old one, so a crash while writing leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from sslplug.errors import CheckpointError

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointWriteError",
    "load_checkpoint",
    "save_checkpoint",
    "write_failure",
]

FORMAT = "sslplug-checkpoint"
VERSION = 1
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
    missing file, one that is not a checkpoint, a truncated one, or one of another format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}: give a run folder that holds {FILENAME} or a "
            f"checkpoint file written by sslplug"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable sslplug checkpoint (truncated, corrupt, or another "
            f"kind of file): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is a PyTorch file but not an sslplug checkpoint (no "
            f"'format': {FORMAT!r} entry)"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {state.get('version')!r}; this sslplug "
            f"reads version {VERSION}"
        )
    return state
