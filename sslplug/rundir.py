"""The run folder: what a run leaves in it, the lock that keeps a second run out while one works
there, and the temporary files that a checkpoint write cut short by a kill leaves behind.

A run folder holds ``settings.toml``, ``last.pt``, ``summary.json``, ``views.png`` and
``tensorboard/`` (``RUN_FILES``). While a run works in it, or ``eval`` or ``finetune`` adds its
results to it, ``.lock`` carries an ``flock`` lock and says who holds it: pid, host, start time
and command. The kernel drops the lock when the process ends, however it ends (``kill -9``
included), so a dead run never leaves its folder locked; the next run takes the lock and writes
its own name over the stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from sslplug.checkpoint import FILENAME, write_failure
from sslplug.errors import SslplugError
from sslplug.monitors.view_grid import FILENAME as VIEWS_FILE

__all__ = ["LOCK_FILE", "MARKERS", "RUN_FILES", "RunFolder", "RunFolderError"]

MARKERS = ("settings.toml", FILENAME, "summary.json")  # a folder holding any of them holds a run
RUN_FILES = (*MARKERS, VIEWS_FILE, "tensorboard")
LOCK_FILE = ".lock"
# save_checkpoint writes last.pt through a temporary file named like this, then renames it
_CHECKPOINT_TEMPORARIES = f".{FILENAME}.*.tmp"


class RunFolderError(SslplugError):
    """The run folder cannot be used: it is a file, cannot be written, is in use by another
    run, or holds a run that the command would overwrite."""


@attrs.define
class RunFolder:
    """The folder of one run, locked while the run works in it.

    ``with RunFolder(path) as folder: folder.lock(); ...`` releases the lock on leaving, an
    exception included, and removes the folders that ``lock`` created if nothing was written in
    them, so that a run refused for its settings leaves nothing behind.
    """

    path: Path
    _fd: int | None = attrs.field(default=None, init=False)
    _created: list[Path] = attrs.field(factory=list, init=False)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def lock(self) -> None:
        """Create the folder if it does not exist and lock it for this process. Raises
        ``RunFolderError`` when the folder cannot be created or written, or when another process
        holds the lock (naming that process)."""
        self._create()
        self._take("wait for it to end or stop it, or give another --out", create=True)
        holder = _holder_line()
        try:
            assert self._fd is not None
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, holder.encode() + b"\n", 0)
        except OSError as exc:
            self.release()
            raise RunFolderError(
                f"could not write {str(self.path / LOCK_FILE)!r}: {write_failure(exc)}; make "
                f"room and run again"
            ) from None

    def lock_to_add(self, command: str) -> None:
        """Lock the folder of a run for ``command`` (``eval``, ``finetune``), which reads the
        run and adds its results to the run's ``summary.json`` and TensorBoard log: refused at
        once, naming the holder, while a run (or another command) works in the folder, and a
        run started meanwhile is refused in turn. A folder that does not exist is not created
        (the command then says that there is no run there). Where no lock file can be made or
        locked (a folder this process may not write, a file system without ``flock``), no run
        can work either, and the command goes on without the lock: its own write says what
        failed."""
        if not self.path.is_dir():
            return
        advice = f"wait for it to end or stop it, then run `sslplug {command}` again"
        if not self._take(advice, create=False):
            return
        with contextlib.suppress(OSError):  # who holds it, for a run refused meanwhile
            assert self._fd is not None
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, _holder_line().encode() + b"\n", 0)

    def _take(self, advice: str, create: bool) -> bool:
        """Take the ``flock`` of ``.lock``; ``advice`` says what to do when another process
        holds it. Without ``create``, a lock file that cannot be made or locked is no error:
        returns whether the lock was taken."""
        lock = self.path / LOCK_FILE
        while self._fd is None:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if create:
                    raise RunFolderError(
                        f"cannot write in the run folder {str(self.path)!r}: "
                        f"{write_failure(exc)}; make it writable or give another --out"
                    ) from None
                try:  # a run of another user may hold a lock file this process cannot write
                    fd = os.open(lock, os.O_RDONLY)
                except OSError:
                    return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(fd)
                os.close(fd)
                if not isinstance(exc, BlockingIOError):
                    if not create:
                        return False
                    raise RunFolderError(
                        f"cannot lock the run folder {str(self.path)!r}: {write_failure(exc)}; "
                        f"give an --out on a local file system"
                    ) from None
                raise RunFolderError(
                    f"the run folder {str(self.path)!r} is in use by another sslplug command "
                    f"({holder or 'which has not written its name yet'}); {advice}"
                ) from None
            if _same_file(fd, lock):
                self._fd = fd
            else:  # the holder before us removed the file as it let go: lock the new one
                os.close(fd)
        return True

    def release(self) -> None:
        """Let go of the lock and remove the lock file; then remove the folders that ``lock``
        created, if they are still empty."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()  # while still holding it: see ``lock``
            os.close(self._fd)
            self._fd = None
        for folder in self._created:  # innermost first; rmdir refuses a folder with files
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def run_files(self) -> list[str]:
        """The names of ``MARKERS`` found in the folder: non-empty when it holds a run."""
        return [name for name in MARKERS if (self.path / name).exists()]

    def start_new_run(self, overwrite: bool) -> list[str]:
        """Make the folder ready for a new run: refuse one that holds a run, unless
        ``overwrite``, in which case that run's ``RUN_FILES`` are removed (so that, among
        other things, two runs' TensorBoard events never mix). Returns the names removed."""
        found = self.run_files()
        if found and not overwrite:
            raise RunFolderError(
                f"{str(self.path)!r} already holds a run ({', '.join(found)}): continue it with "
                f"`sslplug run --resume {self.path}`, start it over with --overwrite (which "
                f"deletes its {', '.join(RUN_FILES)}), or give another --out"
            )
        return self.remove(RUN_FILES) if found else []

    def remove(self, names: tuple[str, ...]) -> list[str]:
        """Remove the files and folders ``names`` of the run folder; returns those there were.
        Only the holder of the lock may: another run could be using them."""
        assert self.locked, "remove the run's files only while holding the lock"
        removed = []
        for name in names:
            path = self.path / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
                else:
                    continue
            except OSError as exc:
                raise RunFolderError(
                    f"could not remove {str(path)!r}: {write_failure(exc)}; remove it yourself "
                    f"or give another --out"
                ) from None
            removed.append(name)
        return removed

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files of checkpoint writes that a kill cut short
        (``.last.pt.*.tmp``); returns them. Only the holder of the lock may: while a run works
        in the folder, its temporary file is a checkpoint being written."""
        assert self.locked, "remove temporary files only while holding the lock"
        stale = sorted(self.path.glob(_CHECKPOINT_TEMPORARIES))
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stale

    def _create(self) -> None:
        """``mkdir -p`` the folder, remembering what it made; a ``RunFolderError`` naming the
        file in the way, or saying why the folder cannot be made."""
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            in_the_way = next(
                (p for p in (self.path, *self.path.parents) if p.exists() and not p.is_dir()),
                None,
            )
            if in_the_way == self.path:
                raise RunFolderError(
                    f"--out {str(self.path)!r} is a file, not a folder; give a folder for the run "
                    f"(a new one, or one without a run in it)"
                ) from None
            if in_the_way is not None:
                raise RunFolderError(
                    f"cannot create the run folder {str(self.path)!r}: {str(in_the_way)!r} is a "
                    f"file, not a folder; give an --out under a folder"
                ) from None
            parent = next((p for p in self.path.parents if p.exists()), self.path.parent)
            raise RunFolderError(
                f"cannot create the run folder {str(self.path)!r} in {str(parent)!r}: "
                f"{write_failure(exc)}; give an --out in a folder you can write to"
            ) from None
        self._created = missing  # innermost first


def _holder_line() -> str:
    """What a lock file says of this process: pid, host, start time and command."""
    return (
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(sys.argv)}"
    )


def _read(fd: int) -> str:
    """The holder's line in a lock file, or '' when it has not written it yet."""
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
