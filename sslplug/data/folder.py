"""Image folders, and the rule for keeping decoded images in memory or streaming them.

A folder holds class subfolders (labelled) or images directly (unlabelled), not both, with
optional ``train/`` and ``test/`` subfolders. A folder that cannot be listed is an error naming
it; an unreadable image or a broken link is skipped and counted. Its images keep a resolution of
their own (``sslplug.data.decode``): in memory when they fit in ``data.cache_gb`` (``hold``),
otherwise decoded from their files every epoch in DataLoader workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from sslplug.config import DataSettings
from sslplug.data.decode import decode_all, decode_image, decoded, stored_side
from sslplug.data.split import DataSet, Split
from sslplug.data.store import ImageStore
from sslplug.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "hold", "hold_out", "load_folder"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """Image files with labels; ``__getitem__`` gives ``(uint8 (3, h, w), label)`` at the
    stored resolution (``decode_image``: upright, shorter side at most ``short_side``), or
    ``None`` for a file that cannot be decoded (left out, and counted)."""

    def __init__(self, files: list[Path], labels: list[int], short_side: int, strict: bool) -> None:
        self.files, self.labels, self.short_side, self.strict = files, labels, short_side, strict

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path = self.files[index]
        image = decoded(
            lambda: decode_image(path, self.short_side),
            f"image {str(path)!r}",
            self.strict,
            "Remove the file, or set data.strict=false to skip unreadable images",
            logged=f"image {path}",
        )
        return None if image is None else (image, self.labels[index])


@attrs.define
class _Scan:
    """What scanning one folder found: its images with labels, class names, and broken links."""

    files: list[Path]
    labels: list[int]
    classes: tuple[str, ...]
    broken_links: list[Path]


def _entries(folder: Path, data: Path) -> list[Path]:
    """The entries of ``folder``, sorted; ``DataError`` naming it when it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise unreadable_folder(folder, data, exc) from None


def unreadable_folder(folder: Path | str, data: Path, exc: OSError) -> DataError:
    reason = exc.strerror or str(exc)
    if Path(folder) == data:
        where, other = "", ""
    else:
        where, other = f" in the data folder {str(data)!r}", ", or move it out of the data folder"
    return DataError(
        f"cannot read the folder {str(folder)!r}{where}: {reason}. Give the user running sslplug "
        f"permission to list and open it (for instance chmod a+rx {str(folder)!r}){other}"
    )


def _is_broken_link(path: Path) -> bool:
    """A symbolic link that leads nowhere: its target is missing, or it loops."""
    return path.is_symlink() and not path.exists()


def _kinds(folder: Path, data: Path, broken: list[Path]) -> tuple[list[Path], list[Path]]:
    """The image files and the subfolders directly in ``folder``, sorted; its broken links are
    added to ``broken``."""
    images, folders = [], []
    for path in _entries(folder, data):
        try:
            if path.is_file():
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(path)
            elif path.is_dir():
                folders.append(path)
            elif _is_broken_link(path):
                broken.append(path)
        except OSError as exc:  # listed but not searchable: no one can open what is in it
            raise unreadable_folder(folder, data, exc) from None
    return images, folders


def _scan(folder: Path, data: Path) -> _Scan:
    """Images in class subfolders (labelled) or directly in ``folder`` (unlabelled), not both.

    A folder holding images beside class folders is refused: taking either part alone would drop
    the other without a word, and which one the user meant cannot be told.
    """
    broken: list[Path] = []
    loose, subfolders = _kinds(folder, data, broken)
    class_images = {}
    for sub in subfolders:
        broken_in_sub: list[Path] = []
        found, _ = _kinds(sub, data, broken_in_sub)
        if found:  # a folder without images is no class, and its links are not data
            class_images[sub.name] = found
            broken += broken_in_sub
    if class_images and loose:
        names = sorted(class_images)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DataError(
            f"{len(loose)} image(s) directly in {str(folder)!r} (such as {loose[0].name!r}) "
            f"beside {len(names)} class folder(s) of images ({shown}): put the loose images in "
            f"a class folder for labelled data, or use a folder of only images for unlabelled "
            f"data"
        )
    if not class_images:
        return _Scan(loose, [-1] * len(loose), (), broken)
    files, labels = [], []
    for index, found in enumerate(class_images.values()):
        files += found
        labels += [index] * len(found)
    return _Scan(files, labels, tuple(class_images), broken)


def load_folder(settings: DataSettings, seed: int) -> DataSet:
    root = Path(settings.name).expanduser()
    try:
        has_splits = (root / "train").is_dir()
        parts = {"train": root / "train", "test": root / "test"} if has_splits else {"train": root}
        if has_splits and not parts["test"].is_dir():
            del parts["test"]
    except OSError as exc:
        raise unreadable_folder(root, root, exc) from None
    scanned = {name: _scan(folder, root) for name, folder in parts.items()}
    if has_splits:
        loose = _kinds(root, root, [])[0]
        if loose:
            raise DataError(
                f"{len(loose)} image(s) directly in {str(root)!r} (such as {loose[0].name!r}) "
                f"beside its train/ folder, which alone is read: move them into train/ or "
                f"test/, or out of {str(root)!r}"
            )
    train = scanned["train"]
    files, labels, classes = train.files, train.labels, train.classes
    if not files:
        raise DataError(
            f"no images found in {str(parts['train'])!r}: expected class subfolders of images, "
            f"or image files ({', '.join(IMAGE_EXTENSIONS)}) directly in it"
        )
    if "test" in scanned and scanned["test"].classes and scanned["test"].classes != classes:
        raise DataError(
            f"the class folders of {str(parts['test'])!r} {scanned['test'].classes} differ from "
            f"those of {str(parts['train'])!r} {classes}"
        )
    broken = [link for scan in scanned.values() for link in scan.broken_links]
    if broken:
        log.warning(
            "skipped %d broken symbolic link(s) under %s (the target is missing, or the link "
            "loops), such as %s -> %s",
            len(broken),
            root,
            broken[0],
            os.readlink(broken[0]),
        )
    size = settings.image_size or _default_size(files, root)
    lists = {"train": (files, labels)}
    if "test" in scanned and scanned["test"].files:
        lists["test"] = (scanned["test"].files, scanned["test"].labels)
    elif classes and settings.test_fraction > 0:
        lists = hold_out(files, labels, settings.test_fraction, seed)
    short = stored_side(size, settings.store_scale)
    sources = {
        name: ImageFolder(f, lab, short, settings.strict) for name, (f, lab) in lists.items()
    }
    total = sum(len(f) for f, _ in lists.values())
    splits, skipped = hold(sources, total * 3 * short * short * 4 / 3, size, settings, root)
    return DataSet(
        name=str(root),
        train=splits["train"],
        test=splits.get("test") if classes else None,
        image_size=size,
        classes=classes,
        skipped=skipped + len(broken),
    )


def hold_out(
    files: list[Any], labels: list[int], fraction: float, seed: int
) -> dict[str, tuple[list[Any], list[int]]]:
    """A seeded random ``fraction`` of a labelled list held out as the test split."""
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[: max(1, int(len(files) * fraction))])
    return {
        "train": (
            [f for i, f in enumerate(files) if i not in held],
            [lab for i, lab in enumerate(labels) if i not in held],
        ),
        "test": ([files[i] for i in sorted(held)], [labels[i] for i in sorted(held)]),
    }


def hold(
    sources: Mapping[str, Any],
    estimated_bytes: float,
    size: int,
    settings: DataSettings,
    where: Path,
) -> tuple[dict[str, Split], int]:
    """Decode every split into memory when ``estimated_bytes`` fits in ``data.cache_gb``,
    otherwise leave each split to be decoded in workers every epoch. Returns the splits and
    the number of unreadable images met while decoding."""
    in_memory = estimated_bytes <= settings.cache_gb * 2**30
    splits: dict[str, Split] = {}
    skipped = 0
    for name, source in sources.items():
        labels = torch.tensor(getattr(source, "labels", []), dtype=torch.int64)
        if not in_memory:
            splits[name] = Split(labels=labels, source=source, image_size=size)
            continue
        pixels, shapes, labels_t, n_bad = decode_all(source, settings.workers)
        skipped += n_bad
        if not len(shapes):
            raise DataError(f"none of the {len(source)} images under {str(where)!r} could be read")
        splits[name] = _in_memory(pixels, shapes, labels_t, size)
    if not in_memory:
        log.info(
            "%s does not fit in data.cache_gb=%s: its images are decoded every epoch; "
            "sslplug prepare %s OUT writes them once in a form that streams faster",
            where,
            settings.cache_gb,
            where,
        )
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s", skipped, where)
    return splits, skipped


def _in_memory(pixels: Tensor, shapes: Tensor, labels: Tensor, size: int) -> Split:
    """Decoded images (``decode_all``) of one shape become one tensor (the path of equal-size
    data such as CIFAR, a view of ``pixels``); images of their own sizes, an in-memory store."""
    if bool((shapes == shapes[0]).all()):
        height, width = (int(v) for v in shapes[0])
        images = pixels.view(len(shapes), 3, height, width)
        return Split(labels=labels, images=images, image_size=size)
    return Split(labels=labels, store=ImageStore.from_pixels(pixels, shapes), image_size=size)


def _default_size(files: list[Path], root: Path) -> int:
    """The median shorter side of up to 100 images spread over the listing (read from their
    headers), at most 224: a folder's own default crop size, never the size of one file."""
    step = max(1, len(files) // 100)
    sides = []
    for path in files[::step][:100]:
        try:
            with Image.open(path) as pil:
                sides.append(min(pil.size))
        except Exception:
            continue
    if not sides:
        raise DataError(f"none of the sampled images under {str(root)!r} could be read")
    size = min(224, int(torch.tensor(sides).median()))
    if size < 8:
        raise DataError(
            f"the images under {str(root)!r} are tiny (median shorter side {size} px); crops "
            f"need at least 8 px: set data.image_size (8 to 1024) to the size to train at"
        )
    return size
