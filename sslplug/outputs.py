"""Files written after a run: an exported backbone and its note, evaluations in ``summary.json``.

Each is written like a checkpoint: into a temporary file ``.NAME.XXXXXXXX.tmp`` beside it, then
renamed over it, so a failure (no permission, a full disk) leaves nothing half-written and the
file that was there, if any, as it was. ``check_new_file`` is what an export asks before it
writes: an sslplug checkpoint is never replaced, and another existing file only when asked to.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sslplug.checkpoint import is_checkpoint_file, write_failure
from sslplug.errors import OutputError

__all__ = [
    "check_name_lengths",
    "check_new_file",
    "check_outside_data",
    "read_summary",
    "write_atomically",
]

# the longest name of a file or folder on the usual file systems (ext4, XFS, btrfs, tmpfs)
NAME_MAX = 255
# write_atomically writes NAME first as .NAME.XXXXXXXX.tmp: that many bytes longer
TEMPORARY_EXTRA = len("..12345678.tmp")

# what to do when a write into FOLDER failed for this reason
_REMEDIES = {
    errno.EACCES: "make {folder!r} writable (chmod u+w), then try again",
    errno.EPERM: "make {folder!r} writable (chmod u+w), then try again",
    errno.EROFS: "choose a place on a file system that can be written, then try again",
    errno.ENOSPC: "make room on the disk, then try again",
    errno.EDQUOT: "make room on the disk, then try again",
    errno.EFBIG: "raise the limit on file sizes (`ulimit -f`), then try again",
}


def _name_max(path: Path) -> int:
    """The longest name the file system holding ``path`` (its nearest existing folder) takes."""
    for folder in (path.parent, *path.parents):
        try:
            return int(os.pathconf(folder, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):  # missing, or no pathconf (Windows)
            continue
    return NAME_MAX


def check_name_lengths(path: str | Path, what: str, reserve: int = 0, why: str = "") -> None:
    """Raise ``OutputError`` when a name in ``path`` is longer than its file system takes
    (255 bytes on the usual ones), naming ``what`` (``--out``, ``OUT``) and the name, rather
    than letting the first ``stat`` fail with ``File name too long``. The last name must leave
    ``reserve`` bytes more, for the names it is first written under, which ``why`` says."""
    path = Path(path)
    limit = _name_max(path.expanduser().absolute())
    names = list(path.parts)
    for index, name in enumerate(names):
        room = limit - reserve if index == len(names) - 1 and path.name else limit
        size = len(os.fsencode(name))
        if size > room:
            shown = name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}"
            raise OutputError(
                f"{what} {str(path)!r} holds a name of {size} bytes ({shown!r}); a file or "
                f"folder name may have at most {room} bytes here{why}: give a shorter name"
            )


def check_outside_data(
    out: str | Path, data: str, what: str, data_flag: str, flag: str = ""
) -> None:
    """Raise ``OutputError`` when the folder ``out`` is the data folder ``data`` or lies inside
    it (paths resolved, links followed): what is written there (a run's ``views.png``, shard
    files) would be read back as images by the next run or ``prepare`` on that data. ``what``
    and ``data_flag`` name the two as the user gave them (``--out``, ``--data``), ``flag`` what
    to give instead (``what`` by default). A data folder inside ``out`` is the user's business.
    """
    data_path = Path(data).expanduser()
    try:
        if not data_path.is_dir():
            return
        data_dir, out_dir = data_path.resolve(), Path(out).expanduser().resolve()
    except (OSError, RuntimeError):  # cannot be reached, or a link loop: said elsewhere
        return
    if out_dir != data_dir and data_dir not in out_dir.parents:
        return
    where = "is" if out_dir == data_dir else "lies inside"
    raise OutputError(
        f"{what} {str(out)!r} {where} the {data_flag} folder {data!r} ({str(data_dir)!r}): the "
        f"files sslplug writes there (a run's views.png) would be read as data by the next run "
        f"or prepare on it; give {flag or what} a folder outside {data!r}"
    )


def check_new_file(path: Path, force: bool, keep: Iterable[Path] = ()) -> None:
    """Raise ``OutputError`` unless a file may be written at ``path``.

    Refused: a folder, a path under a file, a device, pipe or socket, an sslplug checkpoint
    (whole or truncated) or one of the files ``keep`` (never, even with ``force``), and any other
    existing file (unless ``force``); a name too long for the file system.
    """
    check_name_lengths(
        path, "the file", TEMPORARY_EXTRA,
        f" (it is written first under a temporary name {TEMPORARY_EXTRA} bytes longer)",
    )
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


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of the run in ``run_dir`` (``{}`` when there is none). Raises
    ``OSError`` when it cannot be read, ``ValueError`` when it is not the JSON object, with a
    list of evaluations, that sslplug writes; the caller says what to do."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(summary, dict) or not isinstance(summary.get("evaluations", []), list):
        raise ValueError("it is not the JSON object with a list of evaluations sslplug writes")
    return summary
