"""Files written after a run: an exported backbone and its note, evaluations in ``summary.json``.

Each is written like a checkpoint: into a temporary file ``.NAME.XXXXXXXX.tmp`` beside it, then
renamed over it, so a failure (no permission, a full disk) leaves nothing half-written and the
file that was there, if any, as it was. ``check_new_file`` is what an export asks before it
writes: an sslplug checkpoint is never replaced, and another existing file only when asked to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from sslplug.checkpoint import is_checkpoint_file, write_failure
from sslplug.errors import OutputError

__all__ = ["check_new_file", "write_atomically"]

# what to do when a write into FOLDER failed for this reason
_REMEDIES = {
    errno.EACCES: "make {folder!r} writable (chmod u+w), then try again",
    errno.EPERM: "make {folder!r} writable (chmod u+w), then try again",
    errno.EROFS: "choose a place on a file system that can be written, then try again",
    errno.ENOSPC: "make room on the disk, then try again",
    errno.EDQUOT: "make room on the disk, then try again",
    errno.EFBIG: "raise the limit on file sizes (`ulimit -f`), then try again",
}


def check_new_file(path: Path, force: bool, keep: Iterable[Path] = ()) -> None:
    """Raise ``OutputError`` unless a file may be written at ``path``.

    Refused: a folder, a path under a file, a device, pipe or socket, an sslplug checkpoint
    (whole or truncated) or one of the files ``keep`` (never, even with ``force``), and any other
    existing file (unless ``force``).
    """
    if path.is_dir():
        raise OutputError(
            f"{str(path)!r} is a folder; give the name of a file to write in it, such as "
            f"{str(path / 'backbone.pt')!r}"
        )
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(
            f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder; give a "
            f"path in a folder"
        )
    if not (path.exists() or path.is_symlink()):
        return
    if path.exists() and not path.is_file():
        raise OutputError(
            f"{str(path)!r} is not a regular file (a device, a pipe or a socket), which is never "
            f"replaced (not even with --force); give another name"
        )
    if is_checkpoint_file(path):
        raise OutputError(
            f"{str(path)!r} is an sslplug checkpoint, which is never overwritten (not even with "
            f"--force); give another name"
        )
    if any(_same_file(path, kept) for kept in keep):
        raise OutputError(
            f"{str(path)!r} is a file of the run itself, which is never overwritten (not even "
            f"with --force); give another name"
        )
    if not force:
        raise OutputError(
            f"{str(path)!r} already exists; give another name, or add --force to replace it"
        )


def write_atomically(files: Mapping[Path, bytes]) -> None:
    """Write each ``{path: content}`` of ``files``: all into temporary files first, then each
    renamed over its path. Folders are created as needed. When a write fails, the temporary
    files and the folders made for them are removed, the paths are left as they were, and
    ``OutputError`` says which file could not be written, why, and what to do."""
    created: list[Path] = []  # folders made here, innermost first
    temporaries: dict[Path, Path] = {}
    renamed: list[str] = []
    current = next(iter(files), Path())
    try:
        for current, content in files.items():
            created += _make_folder(current.parent)
            temporary = current.with_name(f".{current.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            temporaries[current] = temporary
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        for current, temporary in list(temporaries.items()):
            os.replace(temporary, current)
            del temporaries[current]
            renamed.append(str(current))
    except BaseException as exc:
        for temporary in temporaries.values():
            with contextlib.suppress(OSError):
                temporary.unlink()
        for folder in created:  # rmdir refuses a folder that holds anything
            try:
                folder.rmdir()
            except OSError:
                break
        if not isinstance(exc, OSError):
            raise
        folder = next((p for p in current.parents if p.exists()), current.parent)
        remedy = _REMEDIES.get(exc.errno or 0, "check the path, then try again")
        remedy = remedy.format(folder=str(folder))
        written = f"only {', '.join(renamed)} was written" if renamed else "nothing was written"
        raise OutputError(
            f"could not write {str(current)!r}: {write_failure(exc)}; {remedy} ({written})"
        ) from None


def _make_folder(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it made, innermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _same_file(path: Path, other: Path) -> bool:
    try:
        return path.samefile(other)
    except OSError:
        return False
