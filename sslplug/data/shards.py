"""WebDataset shards: a ``.tar`` file, or a folder of them, indexed once and read in place.

``train/`` and ``test/`` subfolders of shards give the splits. Each shard is indexed once with
``tarfile`` (``_scan_shard``) and its images are read in place by index (``ShardSamples``); an
image under any of the usual extensions and an integer label ``.cls`` on every sample or on
none. Like a folder's, the images are held in memory or streamed (``sslplug.data.folder.hold``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sslplug.config import DataSettings
from sslplug.data.decode import decode_image, decoded, stored_side
from sslplug.data.folder import IMAGE_EXTENSIONS, hold, hold_out
from sslplug.data.split import DataSet
from sslplug.errors import DataError

__all__ = ["MAX_CLASSES", "ShardSamples", "load_shards", "shard_files"]


def shard_files(path: Path) -> dict[str, list[Path]] | None:
    """The WebDataset shards at ``path`` by split: a ``.tar`` file, a folder of them, or
    ``train/`` and ``test/`` folders of them; ``None`` when there are none."""
    if path.is_file():
        return {"train": [path]}
    if (path / "train").is_dir():
        found = {
            name: sorted((path / name).glob("*.tar"))
            for name in ("train", "test")
            if (path / name).is_dir()
        }
    else:
        found = {"train": sorted(path.glob("*.tar"))}
    found = {name: files for name, files in found.items() if files}
    return found if "train" in found else None


class ShardSamples(Dataset):
    """The samples of WebDataset shards by index: ``(uint8 (3, h, w), label)`` at the stored
    resolution, or ``None`` for a sample without a readable image.

    Each shard is read once when this is made, with Python's ``tarfile`` (``_scan_shard``):
    checked whole, its members grouped into samples by key, its labels read and the place of
    each sample's image noted. An image is then read in place with ``os.pread`` and decoded,
    each process with file descriptors of its own (a few shards open at once).
    """

    def __init__(self, shards: list[Path], short_side: int, strict: bool) -> None:
        self.shards, self.short_side, self.strict = shards, short_side, strict
        self.counts: list[int] = []
        self.labels: list[int] = []
        self.unlabelled: tuple[Path, str] | None = None  # (shard, member) of one, for messages
        self.labelled = 0
        self._stamps: list[tuple[int, int]] = []  # each shard's size and mtime when scanned
        places: list[int] = []  # each sample's image: byte offset and size (-1: no image)
        self._files: dict[int, list[str]] = {}  # the files of each sample without an image
        for shard in shards:
            scan = _scan_shard(shard)
            start = len(self.labels)
            self.counts.append(len(scan.labels))
            self.labels += scan.labels
            self.labelled += sum(label >= 0 for label in scan.labels)
            if self.unlabelled is None and scan.unlabelled is not None:
                self.unlabelled = (shard, scan.unlabelled)
            self._stamps.append(scan.stamp)
            places += scan.places
            self._files.update({start + i: files for i, files in scan.files.items()})
        self._places = torch.tensor(places, dtype=torch.int64).view(-1, 2)
        self.starts = [0]
        for count in self.counts:
            self.starts.append(self.starts[-1] + count)
        self._fds: dict[int, dict[int, int]] = {}  # pid: {shard number: fd}, least recent first

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_fds": {}}  # file descriptors stay with their process

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files this process opened."""
        for fd in getattr(self, "_fds", {}).pop(os.getpid(), {}).values():
            os.close(fd)

    def _read(self, number: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of shard ``number``, read through a file descriptor of
        this process; beyond ``_OPEN_SHARDS`` open shards, the least recently used is closed."""
        shard = self.shards[number]
        changed = (
            f"the WebDataset shard {str(shard)!r} changed while it was read (its size or time "
            f"of modification is not what it was when it was indexed); write shards before a "
            f"run, not during it, and start again"
        )
        fds = self._fds.setdefault(os.getpid(), {})
        try:
            fd = fds.pop(number, None)
            if fd is None:
                fd = os.open(shard, os.O_RDONLY)
                stat = os.fstat(fd)
                if (stat.st_size, stat.st_mtime_ns) != self._stamps[number]:
                    os.close(fd)
                    raise DataError(changed)
                while len(fds) >= _OPEN_SHARDS:
                    os.close(fds.pop(next(iter(fds))))
            fds[number] = fd  # last: the most recently used
            data = os.pread(fd, size, offset)
        except OSError as exc:
            raise DataError(f"cannot read the WebDataset shard {str(shard)!r}: {exc}") from None
        if len(data) != size:
            raise DataError(changed)
        return data

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        import bisect

        if not 0 <= index < len(self.labels):
            raise IndexError(f"sample {index} of {len(self.labels)}")
        number = bisect.bisect_right(self.starts, index) - 1
        offset, size = self._places[index].tolist()
        data = self._read(number, offset, size) if size >= 0 else b""
        try:
            if size < 0:
                raise ValueError(
                    f"no image among its files {self._files[index]} (an image has one of the "
                    f"extensions {', '.join(sorted(_IMAGE_KEYS))})"
                )
            return decode_image(data, self.short_side), self.labels[index]
        except Exception as exc:
            failure = exc

        def fail() -> Tensor:
            raise failure

        what = self._sample(number, index, offset)
        decoded(fail, what, self.strict, "Set data.strict=false to skip unreadable samples")
        return None

    def _sample(self, number: int, index: int, offset: int) -> str:
        """Which sample ``index`` (of shard ``number``, its image at ``offset``) is, for a
        message; the names of files are not kept, so that of its image is read again."""
        where = f"in the WebDataset shard {str(self.shards[number])!r}"
        files = self._files.get(index)
        if files is not None:
            return f"the image of sample {_key(files[0])[0]!r} {where}"
        name = _member_names(self.shards[number], self._stamps[number]).get(offset)
        if name is None:
            return f"the image at byte {offset} {where}"
        return f"the image {name!r} of sample {_key(name)[0]!r} {where}"


_IMAGE_KEYS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS} | {"image", "img"}
_OPEN_SHARDS = 16  # shards each process keeps open (a file descriptor each)
MAX_CLASSES = 100_000  # a .cls label above this is a mistake, not a class (ImageNet-21k: 21,841)


@attrs.frozen
class _Member:
    """A file in a tar shard: its name, and where its bytes lie."""

    name: str
    offset: int
    size: int


@attrs.define
class _ShardScan:
    """What ``_scan_shard`` found: the shard's size and time of modification; each sample's
    label (-1: no ``.cls``) and its image's byte offset and size, one after another (size -1:
    no image); the files of each sample without an image; a member of the first sample without
    a label."""

    stamp: tuple[int, int]
    labels: list[int] = attrs.field(factory=list)
    places: list[int] = attrs.field(factory=list)
    files: dict[int, list[str]] = attrs.field(factory=dict)
    unlabelled: str | None = None


def _key(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member ``name``: the name up to the first dot of its
    base name, the folder part kept (``./v1.0/00042.seg.png``: ``./v1.0/00042``, ``seg.png``);
    no key (``""``) for a name whose base name starts with a dot or has none (``._00042.png``
    that macOS tar adds, ``README``), which belongs to no sample, as in WebDataset."""
    import re

    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name, flags=re.DOTALL)
    return ("", "") if match is None else (match[1], match[2])


def _check_tar(shard: Path) -> tuple[list[_Member], tuple[int, int]]:
    """The files of the tar ``shard`` in order, as Python's ``tarfile`` reads them (names from
    pax and GNU extended headers, a hard link as the file it links to), and the shard's size
    and time of modification; a ``DataError`` when the file is not a whole, uncompressed tar:
    one that is cut short or damaged after some member must not pass for a smaller shard."""
    import tarfile

    def damaged(detail: str) -> DataError:
        return DataError(
            f"the WebDataset shard {str(shard)!r} is truncated or damaged: {detail}. Copy or "
            f"write the shard again"
        )

    files: list[_Member] = []
    named: dict[str, _Member] = {}
    last = None
    try:
        stat = shard.stat()
        size = stat.st_size
        with tarfile.open(shard, "r:", encoding="utf-8", errors="surrogateescape") as tar:
            try:
                for member in tar:
                    last = member
                    if member.isreg():
                        if member.issparse():
                            raise DataError(
                                f"the member {member.name!r} of the WebDataset shard "
                                f"{str(shard)!r} is stored sparse (tar --sparse), which cannot "
                                f"be read in place; pack the shard again without --sparse"
                            )
                        end = member.offset_data + member.size
                        if end > size:
                            raise damaged(
                                f"its member {member.name!r} ends at byte {end}, past the end "
                                f"of the file ({size} bytes)"
                            )
                        named[member.name] = _Member(member.name, member.offset_data, member.size)
                        files.append(named[member.name])
                    elif member.islnk() and member.linkname in named:
                        target = named[member.linkname]
                        files.append(_Member(member.name, target.offset, target.size))
                assert tar.fileobj is not None
                tar.fileobj.seek(tar.offset)
                tail = tar.fileobj.read(tarfile.BLOCKSIZE)
            except tarfile.ReadError as exc:
                if last is None:
                    raise
                raise damaged(f"it ends inside or after its member {last.name!r} ({exc})") from None
    except tarfile.ReadError as exc:
        raise DataError(
            f"the WebDataset shard {str(shard)!r} is not an uncompressed tar file ({exc}); "
            f"give .tar shards as WebDataset writes them (tar -cf, not compressed)"
        ) from None
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read the WebDataset shard {str(shard)!r}: {exc}") from None
    problem = _end_problem(tail, last, tar.offset, size)
    if problem is not None:
        raise damaged(problem)
    return files, (size, stat.st_mtime_ns)


def _end_problem(tail: bytes, last: Any, offset: int, size: int) -> str | None:
    """What a tar of ``size`` bytes holds at ``offset``, after its last member ``last``
    (``None``: no member), when that is not where a complete tar has its next header or its
    end-of-archive blocks (``tail``, the block read there); ``None`` when it is."""
    import tarfile

    if len(tail) >= tarfile.BLOCKSIZE and not any(tail):
        return None
    after = f"after its member {last.name!r}" if last is not None else "at its start"
    if not tail:
        found = "nothing"
    elif len(tail) < tarfile.BLOCKSIZE:
        found = f"only {len(tail)} bytes, not a whole tar header,"
    else:
        found = "a block that is not a valid tar header"
    return (
        f"{after} (byte {offset} of {size}) it holds {found} where a complete tar has "
        f"a header or its end-of-archive blocks"
    )


_NAMES: dict[tuple[Path, tuple[int, int]], dict[int, str]] = {}  # _member_names' last


def _member_names(shard: Path, stamp: tuple[int, int]) -> dict[int, str]:
    """The name of each file of ``shard`` by the offset of its bytes, for messages (the last
    shard asked for is kept; ``{}`` when it can no longer be read)."""
    cached = _NAMES.get((shard, stamp))
    if cached is None:
        try:
            cached = {}
            for file in _check_tar(shard)[0]:
                cached.setdefault(file.offset, file.name)  # a hard link: the file it links to
        except DataError:
            cached = {}
        _NAMES.clear()
        _NAMES[(shard, stamp)] = cached
    return cached


def _scan_shard(shard: Path) -> _ShardScan:
    """The samples of a tar shard, in order, with their labels and where their images lie.

    A sample is every file of the shard with one key, wherever it lies (``_key``:
    ``./v1.0/00042.png`` and ``./v1.0/00042.cls`` are the sample ``./v1.0/00042``), in the order
    of each key's first file; its image is its first file with an image extension. The shard
    must be a whole tar (``_check_tar``) that holds no name twice, and each ``.cls`` a class
    index from 0 to ``MAX_CLASSES - 1``; anything else is a ``DataError`` naming the shard and
    the member.
    """
    files, stamp = _check_tar(shard)
    samples: dict[str, list[tuple[str, _Member]]] = {}
    seen: set[str] = set()
    for file in files:
        if file.name in seen:
            raise DataError(
                f"the member name {file.name!r} appears more than once in the WebDataset shard "
                f"{str(shard)!r}; each file of a sample needs a name of its own (KEY.png, "
                f"KEY.cls): pack the shard again from a folder"
            )
        seen.add(file.name)
        key, extension = _key(file.name)
        if key:
            samples.setdefault(key, []).append((extension.lower(), file))
    scan = _ShardScan(stamp)
    try:
        with open(shard, "rb") as stream:
            for key, members in samples.items():
                image = next((m for ext, m in members if ext in _IMAGE_KEYS), None)
                cls = next((m for ext, m in members if ext == "cls"), None)
                label = -1
                if cls is not None:
                    stream.seek(cls.offset)
                    label = _shard_label(stream.read(cls.size), shard, key, cls.name)
                elif scan.unlabelled is None:
                    scan.unlabelled = members[0][1].name
                if image is None:
                    scan.files[len(scan.labels)] = [m.name for _, m in members]
                scan.labels.append(label)
                scan.places += (image.offset, image.size) if image is not None else (0, -1)
    except OSError as exc:
        raise DataError(f"cannot read the WebDataset shard {str(shard)!r}: {exc}") from None
    return scan


def _shard_label(data: bytes, shard: Path, key: str, member: str) -> int:
    """The class index a ``.cls`` member holds: ASCII digits, 0 to ``MAX_CLASSES - 1``."""
    import re

    def refused(text: str, why: str) -> DataError:
        return DataError(
            f"the label {text} of sample {key!r} (member {member!r}) in the WebDataset shard "
            f"{str(shard)!r} {why}; a .cls file holds the sample's class index, an integer from "
            f"0 to {MAX_CLASSES - 1}, and either every sample of the data has one or none has"
        )

    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise refused(repr(data[:20]), "is not UTF-8 text") from None
    shown = repr(text if len(text) <= 24 else text[:24] + "...")
    if not re.fullmatch(r"[+-]?[0-9]+", text, flags=re.ASCII):
        raise refused(shown, "is not an integer class index")
    digits = text.lstrip("+-").lstrip("0")
    if text.startswith("-") and digits:
        raise refused(shown, "is negative")
    if len(digits) > len(str(MAX_CLASSES)) or int(digits or "0") >= MAX_CLASSES:
        raise refused(shown, f"is too large to be a class index (at most {MAX_CLASSES} classes)")
    return int(digits or "0")


def load_shards(
    path: Path, shards: dict[str, list[Path]], settings: DataSettings, seed: int
) -> DataSet:
    size = settings.image_size or 64
    short = stored_side(size, settings.store_scale)
    sources: dict[str, Any] = {
        name: ShardSamples(files, short, settings.strict) for name, files in shards.items()
    }
    if not len(sources["train"]):
        raise DataError(
            f"the WebDataset shards of {str(path)!r} hold no samples: a sample is the files of "
            f"a shard that share a key, such as 00042.png and 00042.cls"
        )
    every = [label for source in sources.values() for label in source.labels]
    labelled = sum(source.labelled for source in sources.values())
    if 0 < labelled < len(every):
        shard, member = next(s.unlabelled for s in sources.values() if s.unlabelled is not None)
        raise DataError(
            f"the sample of member {member!r} in the WebDataset shard {str(shard)!r} has no "
            f".cls label, while {labelled} of the {len(every)} samples of {str(path)!r} have "
            f"one: either every sample has a .cls label (labelled data) or none has "
            f"(unlabelled data)"
        )
    classes = tuple(str(c) for c in range(max(every) + 1)) if labelled else ()
    labels = sources["train"].labels
    if labelled and "test" not in sources and settings.test_fraction > 0:
        held = hold_out(list(range(len(labels))), labels, settings.test_fraction, seed)
        whole = sources["train"]
        sources = {
            name: _Relabelled(torch.utils.data.Subset(whole, idx), lab)
            for name, (idx, lab) in held.items()
        }
    total = sum(len(s) for s in sources.values())
    splits, skipped = hold(sources, total * 3 * short * short * 4 / 3, size, settings, path)
    return DataSet(
        name=str(path),
        train=splits["train"],
        test=splits.get("test") if classes else None,
        image_size=size,
        classes=classes,
        skipped=skipped,
    )


class _Relabelled(Dataset):
    """A subset that carries its labels, as ``hold`` expects of a source."""

    def __init__(self, subset: Dataset, labels: list[int]) -> None:
        self.subset, self.labels = subset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        return self.subset[index]
