"""Data sets as uint8 images, and the loader that moves them to the device.

Every data set is a ``DataSet`` with a train split (pre-training, and the kNN memory bank) and,
when labelled, a test split (kNN queries). Built-in data sets are one uint8 tensor
``(N, C, S, S)`` per split. Images of a folder, of prepared data or of shards keep a resolution
of their own (``sslplug.store``): in memory when they fit in ``data.cache_gb``, otherwise read
a batch at a time in DataLoader workers (prepared data: raw pixels or JPEG bytes from shard
files; a folder: decoded from its files every epoch). The loader yields uint8 batches on the
device, where augmentation happens: square batches at ``data.image_size`` for every consumer,
or, for a view generator that crops at the stored resolution, a padded canvas and the extents
of its images (``sslplug.crops``).

Sources:

* ``shapes``, the embedded default: ten classes of geometric shapes drawn procedurally, with
  colours, textures, positions, sizes and orientations that vary at random and carry no
  information about the class. No download; the same images on every machine.
* ``cifar10``, ``cifar100``, ``stl10`` through torchvision, downloaded only when asked.
* any image folder: class subfolders (labelled) or a flat folder (unlabelled), not both, with
  optional ``train/`` and ``test/`` subfolders. A folder that cannot be listed is an error
  naming it; an unreadable image or a broken link is skipped and counted.
* a folder written by ``sslplug prepare`` (``sslplug.store``).
* WebDataset shards: a ``.tar`` file, or a folder of them (``train/`` and ``test/`` subfolders
  of shards give the splits), indexed once with ``tarfile`` and read in place by index; an
  image under any of the usual extensions and an integer label ``.cls`` on every sample or on
  none.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sslplug.config import DataSettings
from sslplug.crops import fit_batch
from sslplug.errors import DataError
from sslplug.store import (
    STORE_MARKER,
    Encoding,
    ImageStore,
    decode_image,
    decode_jpegs,
    pad_batch,
    read_store,
    stored_side,
    write_store,
)

__all__ = [
    "BUILTIN",
    "IMAGE_EXTENSIONS",
    "DataSet",
    "ImageFolder",
    "Loader",
    "Split",
    "load_data",
    "make_shapes",
    "prepare",
]

log = logging.getLogger(__name__)

BUILTIN = ("shapes", "cifar10", "cifar100", "stl10")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHAPE_CLASSES = (
    "disk", "ring", "square", "frame", "triangle",
    "plus", "half_disk", "two_dots", "stripes", "bar",
)  # fmt: skip


@attrs.define
class Split:
    """One split: equal-size images in memory (``images``), images of their own sizes in a
    store (``store``, in memory or on disk), or decoded from files every epoch (``source``).

    ``image_size`` is the side of the squares the loader makes of the images of a store or a
    source for consumers that read fixed-size images (0: ``images`` are those squares).
    """

    labels: Tensor
    images: Tensor | None = None
    source: Dataset | None = None
    store: ImageStore | None = None
    image_size: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> Split:
        """The images ``index`` of this split, held the same way."""
        index = index.cpu()
        labels = self.labels[index]
        if self.images is not None:
            return Split(labels, images=self.images[index], image_size=self.image_size)
        if self.store is not None:
            store = self.store
            picked = ImageStore(
                store.shapes[index],
                store.offsets[index],
                store.lengths[index],
                store.shard[index],
                store.shards,
                store.encoding,
            )
            return Split(labels, store=picked, image_size=self.image_size)
        assert self.source is not None
        source = torch.utils.data.Subset(self.source, index.tolist())
        return Split(labels, source=source, image_size=self.image_size)

    def squares(self, index: Tensor | None = None) -> Split:
        """The images ``index`` (all by default) as an in-memory split of uint8 squares at
        ``image_size`` (images of their own sizes are fitted: shorter side, centre square)."""
        part = self if index is None else self.subset(index)
        if part.images is not None and not self.image_size:
            return part
        batches = Loader(part, 256, torch.device("cpu"), shuffle=False, drop_last=False, workers=0)
        chunks = list(batches.epoch(0))
        images = torch.cat([c[0] for c in chunks]) if chunks else torch.empty(0, dtype=torch.uint8)
        labels = torch.cat([c[1] for c in chunks]) if chunks else part.labels[:0]
        return Split(labels, images=images)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


@attrs.define
class DataSet:
    name: str
    train: Split
    test: Split | None
    image_size: int
    classes: tuple[str, ...] = ()
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ------------------------------------------------------------------------------------------
# the embedded default


def _shape_masks(label: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Boolean masks ``(N, H, W)``: shape ``label[i]`` in the rotated, scaled frame ``(x, y)``."""
    r = torch.sqrt(x**2 + y**2)
    box = torch.maximum(x.abs(), y.abs())
    masks = torch.stack(
        [
            r < 1.0,
            (r > 0.55) & (r < 1.0),
            box < 0.8,
            (box > 0.45) & (box < 0.85),
            (y > -0.5) & (math.sqrt(3.0) * x.abs() + y < 1.0),
            ((x.abs() < 0.3) & (y.abs() < 0.95)) | ((y.abs() < 0.3) & (x.abs() < 0.95)),
            (r < 1.0) & (y > 0.0),
            ((x - 0.55) ** 2 + y**2 < 0.16) | ((x + 0.55) ** 2 + y**2 < 0.16),
            (r < 1.0) & (torch.cos(x * 2.5 * math.pi) > 0.0),
            (x.abs() < 1.0) & (y.abs() < 0.3),
        ],
        dim=1,
    )
    return masks[torch.arange(len(label)), label]


def make_shapes(per_class: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """Draw ``per_class`` images of each of the ten shape classes: ``(uint8 images, labels)``.

    A light shape on a dark ground; position, size, a small rotation and pixel noise are random
    and independent of the class, so the class is in the shape alone. Brightness and colour are
    the same in every image on purpose: when they varied from image to image (random colours,
    random grey levels with a tint, or a textured background), the two views of an image shared
    that cue, BYOL learned it instead of the shape, and kNN accuracy fell below the random
    encoder's (docs/design.md has the figures).
    """
    g = torch.Generator().manual_seed(seed)
    n = per_class * len(SHAPE_CLASSES)
    label = torch.arange(len(SHAPE_CLASSES)).repeat_interleave(per_class)
    label = label[torch.randperm(n, generator=g)]

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    grid = torch.linspace(-1.0, 1.0, size)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy = uniform(-0.2, 0.2, n, 1, 1), uniform(-0.2, 0.2, n, 1, 1)
    scale = uniform(0.6, 0.85, n, 1, 1)
    angle = uniform(-0.3, 0.3, n, 1, 1)
    du, dv = u - cx, v - cy
    x = (du * torch.cos(angle) + dv * torch.sin(angle)) / scale
    y = (-du * torch.sin(angle) + dv * torch.cos(angle)) / scale
    mask = _shape_masks(label, x, y).unsqueeze(1).float()

    background, foreground = 0.15, 0.85
    image = background * (1 - mask) + foreground * mask
    image = image + 0.06 * torch.randn(n, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), label


def _shapes() -> DataSet:
    train, train_labels = make_shapes(per_class=500, seed=0)
    test, test_labels = make_shapes(per_class=100, seed=1)
    return DataSet(
        name="shapes",
        train=Split(images=train, labels=train_labels),
        test=Split(images=test, labels=test_labels),
        image_size=32,
        classes=SHAPE_CLASSES,
    )


# ------------------------------------------------------------------------------------------
# torchvision data sets


def _torchvision(name: str, settings: DataSettings) -> DataSet:
    root = Path(settings.root or Path.home() / ".cache" / "sslplug" / "datasets").expanduser()
    splits: dict[str, Split] = {}
    classes: tuple[str, ...] = ()
    for split in ("train", "test"):
        try:
            if name == "stl10":
                ds = torchvision.datasets.STL10(str(root), split=split, download=settings.download)
                images = torch.from_numpy(ds.data)
                labels = torch.as_tensor(ds.labels, dtype=torch.int64)
            else:
                cls = (
                    torchvision.datasets.CIFAR10
                    if name == "cifar10"
                    else torchvision.datasets.CIFAR100
                )
                ds = cls(str(root), train=split == "train", download=settings.download)
                images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
                labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        except RuntimeError as exc:
            raise DataError(
                f"{name} was not found under {str(root)!r} ({exc}). Put it there, point "
                f"data.root at a folder that holds it, or add --set data.download=true to "
                f"download it (needs internet)"
            ) from None
        except OSError as exc:
            raise DataError(
                f"could not download or read {name} under {str(root)!r}: {exc}"
            ) from None
        classes = tuple(ds.classes)
        splits[split] = Split(images=images, labels=labels)
    train_images = splits["train"].images
    assert train_images is not None  # torchvision splits are held in memory
    size = train_images.shape[-1]
    if settings.image_size and settings.image_size != size:
        for k, s in splits.items():
            assert s.images is not None
            splits[k] = Split(images=_resize(s.images, settings.image_size), labels=s.labels)
        size = settings.image_size
    return DataSet(
        name=name, train=splits["train"], test=splits["test"], image_size=size, classes=classes
    )


def _resize(images: Tensor, size: int) -> Tensor:
    from torchvision.transforms.v2 import functional as F

    return torch.cat(
        [F.resize(chunk, [size, size], antialias=True) for chunk in images.split(1024)]
    )


# ------------------------------------------------------------------------------------------
# image folders


class ImageFolder(Dataset):
    """Image files with labels; ``__getitem__`` gives ``(uint8 (3, h, w), label)`` at the
    stored resolution (``sslplug.store.decode_image``: upright, shorter side at most
    ``short_side``), or ``None`` for a file that cannot be decoded (left out, and counted)."""

    def __init__(self, files: list[Path], labels: list[int], short_side: int, strict: bool) -> None:
        self.files, self.labels, self.short_side, self.strict = files, labels, short_side, strict

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path = self.files[index]
        image = _decoded(
            lambda: decode_image(path, self.short_side),
            f"image {str(path)!r}",
            self.strict,
            "Remove the file, or set data.strict=false to skip unreadable images",
            logged=f"image {path}",
        )
        return None if image is None else (image, self.labels[index])


def _decoded(
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


def _collate(
    items: list[tuple[Tensor, int] | None],
) -> tuple[Tensor, Tensor, Tensor | None, list[int]]:
    """The readable items as a padded batch ``(images, labels, extents)`` (``pad_batch``;
    extents ``None`` when the images fill the batch), and the positions in ``items`` of the
    unreadable ones."""
    good = [item for item in items if item is not None]
    unreadable = [position for position, item in enumerate(items) if item is None]
    if not good:
        empty = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return empty, torch.empty(0, dtype=torch.int64), None, unreadable
    images, extents = pad_batch([img for img, _ in good])
    labels = torch.tensor([lab for _, lab in good], dtype=torch.int64)
    return images, labels, _unless_full(images, extents), unreadable


def _unless_full(images: Tensor, extents: Tensor) -> Tensor | None:
    """``extents``, or ``None`` when every image fills the canvas upright (nothing to avoid
    or to turn back)."""
    full = torch.tensor([*images.shape[-2:], 0], dtype=extents.dtype)
    return None if bool((extents == full).all()) else extents


class _StoreBatches(Dataset):
    """A store read a batch at a time: ``dataset[indices]`` is ``_collate``'s batch, or with
    ``encoded`` the images' stored bytes in place of the images, left to be decoded where the
    batch goes (JPEG on a GPU): one after another in one 1-D uint8 tensor, with their lengths
    (one tensor each would pass one file descriptor each out of a worker, see ``_pack``)."""

    def __init__(self, store: ImageStore, labels: Tensor, encoded: bool = False) -> None:
        self.store, self.labels, self.encoded = store, labels, encoded

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, indices: list[int]) -> tuple[Any, Tensor, Tensor | None, list[int]]:
        if self.encoded:
            encoded = self.store.encoded(indices)
            packed = (torch.cat(encoded), torch.tensor([len(e) for e in encoded]))
            return packed, self.labels[indices], None, []
        images, extents = self.store.read(indices)
        return images, self.labels[indices], _unless_full(images, extents), []


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
        raise _unreadable_folder(folder, data, exc) from None


def _unreadable_folder(folder: Path | str, data: Path, exc: OSError) -> DataError:
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
            raise _unreadable_folder(folder, data, exc) from None
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


def _image_folder(settings: DataSettings, seed: int) -> DataSet:
    root = Path(settings.name).expanduser()
    try:
        has_splits = (root / "train").is_dir()
        parts = {"train": root / "train", "test": root / "test"} if has_splits else {"train": root}
        if has_splits and not parts["test"].is_dir():
            del parts["test"]
    except OSError as exc:
        raise _unreadable_folder(root, root, exc) from None
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
        lists = _hold_out(files, labels, settings.test_fraction, seed)
    short = stored_side(size, settings.store_scale)
    sources = {
        name: ImageFolder(f, lab, short, settings.strict) for name, (f, lab) in lists.items()
    }
    total = sum(len(f) for f, _ in lists.values())
    splits, skipped = _hold(sources, total * 3 * short * short * 4 / 3, size, settings, root)
    return DataSet(
        name=str(root),
        train=splits["train"],
        test=splits.get("test") if classes else None,
        image_size=size,
        classes=classes,
        skipped=skipped + len(broken),
    )


def _hold_out(
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


def _hold(
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
        pixels, shapes, labels_t, n_bad = _decode_all(source, settings.workers)
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
    """Decoded images (``_decode_all``) of one shape become one tensor (the path of equal-size
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


def _pack(
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


def _unpack(pixels: Tensor, shapes: Tensor) -> Iterator[Tensor]:
    """The images of a packed batch (``_pack``), uint8 ``(3, h, w)`` views of ``pixels``."""
    offset = 0
    for height, width in shapes.tolist():
        length = 3 * height * width
        yield pixels[offset : offset + length].view(3, height, width)
        offset += length


def _packed_batches(
    source: Dataset, workers: int, batch_size: int = 64
) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
    """``source`` decoded in ``workers`` processes, a packed batch (``_pack``) at a time."""
    loader = DataLoader(source, batch_size=batch_size, num_workers=workers, collate_fn=_pack)
    yield from loader


def _decode_all(source: Dataset, workers: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Every image of ``source``, decoded in ``workers`` processes, packed (``_pack``): their
    pixels one after another, their shapes, their labels, and how many could not be read.

    Each batch is copied out of the worker's shared memory as it arrives (releasing its file
    descriptors), so no limit on open files bounds the size of the data set.
    """
    pixels: list[Tensor] = []
    shapes: list[Tensor] = []
    labels: list[Tensor] = []
    skipped = 0
    for batch_pixels, batch_shapes, batch_labels, unreadable in _packed_batches(source, workers):
        pixels.append(batch_pixels.clone() if workers else batch_pixels)
        shapes.append(batch_shapes.clone())
        labels.append(batch_labels.clone())
        skipped += unreadable
    if not pixels:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, dtype=torch.uint8), empty.view(0, 2), empty, skipped
    return torch.cat(pixels), torch.cat(shapes), torch.cat(labels), skipped


def load_data(settings: DataSettings, seed: int = 0) -> DataSet:
    """Load the data set that ``settings.name`` names; raise ``DataError`` when it cannot be."""
    if settings.name == "shapes":
        return _shapes()
    if settings.name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(settings.name, settings)
    path = Path(settings.name).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a folder above it cannot be searched, or a name is too long
        why = (
            "a name in it is longer than the file system allows (255 bytes on the usual ones)"
            if exc.errno == errno.ENAMETOOLONG
            else "a folder on the way to it cannot be searched by the user running sslplug"
        )
        raise DataError(
            f"cannot reach data {settings.name!r}: {exc.strerror or exc} ({why})"
        ) from None
    if not exists:
        raise DataError(
            f"data {settings.name!r} is neither a built-in data set ({', '.join(BUILTIN)}) "
            f"nor an existing folder"
        )
    try:
        prepared = is_dir and (path / STORE_MARKER).is_file()
        shards = _shard_files(path) if path.suffix == ".tar" or is_dir else None
    except OSError as exc:
        raise _unreadable_folder(path, path, exc) from None
    if prepared:
        return _prepared(path, settings)
    if shards:
        return _webdataset(path, shards, settings, seed)
    if not is_dir:
        raise DataError(
            f"data {settings.name!r} is a file; give a folder of images, a folder written by "
            f"sslplug prepare, or WebDataset shards (.tar)"
        )
    return _image_folder(settings, seed)


# ------------------------------------------------------------------------------------------
# prepared data and WebDataset shards


def prepare(
    settings: DataSettings, out: Path, encoding: Encoding = "raw", seed: int = 0
) -> dict[str, Any]:
    """Write the data ``settings`` names (a folder, shards, or a built-in data set) to ``out``
    in the prepared form (``sslplug.store.write_store``), decoding in ``data.workers``
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
        for pixels, shapes, labels, unreadable in _packed_batches(split.source, settings.workers):
            skipped.append(unreadable)
            yield from zip(_unpack(pixels, shapes), labels.tolist())

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


def _prepared(folder: Path, settings: DataSettings) -> DataSet:
    """A folder written by ``sslplug prepare``: in memory when it fits in ``data.cache_gb``,
    otherwise read from its shard files a batch at a time."""
    marker, stores = read_store(folder)
    size = settings.image_size or int(marker["image_size"])
    if stored_side(size, 1.0) > int(marker["short_side"]):
        log.warning(
            "%s was prepared for crops of %s px (images stored with shorter sides up to %s "
            "px); crops of %s px will be upsampled: prepare it again with --image-size %s",
            folder,
            marker["image_size"],
            marker["short_side"],
            size,
            size,
        )
    total = sum(store.nbytes for store, _ in stores.values())
    in_memory = total <= settings.cache_gb * 2**30
    splits = {
        name: Split(
            labels=labels,
            store=store.in_memory() if in_memory else store,
            image_size=size,
        )
        for name, (store, labels) in stores.items()
    }
    classes = tuple(marker["classes"])
    return DataSet(
        name=str(folder),
        train=splits["train"],
        test=splits.get("test") if classes else None,
        image_size=size,
        classes=classes,
    )


def _shard_files(path: Path) -> dict[str, list[Path]] | None:
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
        _decoded(fail, what, self.strict, "Set data.strict=false to skip unreadable samples")
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
    if len(tail) < tarfile.BLOCKSIZE or any(tail):
        after = f"after its member {last.name!r}" if last is not None else "at its start"
        if not tail:
            found = "nothing"
        elif len(tail) < tarfile.BLOCKSIZE:
            found = f"only {len(tail)} bytes, not a whole tar header,"
        else:
            found = "a block that is not a valid tar header"
        raise damaged(
            f"{after} (byte {tar.offset} of {size}) it holds {found} where a complete tar has "
            f"a header or its end-of-archive blocks"
        )
    return files, (size, stat.st_mtime_ns)


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


def _webdataset(
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
        held = _hold_out(list(range(len(labels))), labels, settings.test_fraction, seed)
        whole = sources["train"]
        sources = {
            name: _Relabelled(torch.utils.data.Subset(whole, idx), lab)
            for name, (idx, lab) in held.items()
        }
    total = sum(len(s) for s in sources.values())
    splits, skipped = _hold(sources, total * 3 * short * short * 4 / 3, size, settings, path)
    return DataSet(
        name=str(path),
        train=splits["train"],
        test=splits.get("test") if classes else None,
        image_size=size,
        classes=classes,
        skipped=skipped,
    )


class _Relabelled(Dataset):
    """A subset that carries its labels, as ``_hold`` expects of a source."""

    def __init__(self, subset: Dataset, labels: list[int]) -> None:
        self.subset, self.labels = subset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        return self.subset[index]


# ------------------------------------------------------------------------------------------
# the loader


class Loader:
    """Yields batches on ``device``, and measures waiting for them.

    By default a batch is ``(uint8 images (B, C, S, S), labels)``, images of their own sizes
    fitted to the split's ``image_size`` on the device (``fit_batch``). With
    ``full_resolution`` it is ``(images, labels, extents)``: the stored pixels as a padded
    canvas with each image's height and width (``None`` when all fill the canvas), for view
    generators that crop at the stored resolution.

    ``max_batches`` (0: no limit) cuts every epoch short, for smoke tests and quick looks.

    ``wait_seconds`` accumulates the time spent producing batches (indexing or worker output
    plus the transfer), which the engine reports as the data-wait share of step time.

    ``skipped`` is the number of files of a streamed split found unreadable so far, each
    counted once however many epochs meet it. A split in memory was decoded by ``load_data``,
    which counted its unreadable files in ``DataSet.skipped``; so the images a run skipped are
    ``data.skipped + loader.skipped``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        workers: int = 2,
        max_batches: int = 0,
        rank: int = 0,
        world_size: int = 1,
        full_resolution: bool = False,
    ) -> None:
        self.split, self.batch_size, self.device = split, batch_size, device
        self.max_batches = max_batches
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.seed, self.workers = shuffle, drop_last, seed, workers
        self.full_resolution = full_resolution
        self.wait_seconds = 0.0
        self._unreadable: set[int] = set()  # indices into the split's source
        self._pin = device.type == "cuda"
        store = split.store
        # JPEG bytes from a store are decoded on a GPU, a whole batch in one nvJPEG call
        self.decode_on_device = (
            device.type == "cuda" and store is not None and store.encoding == "jpeg"
        )

    @property
    def skipped(self) -> int:
        """Files of a streamed split that could not be decoded, so far (see the class)."""
        return len(self._unreadable)

    def __len__(self) -> int:
        n = len(self.split)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The batches of one epoch; the order depends only on the seed and ``epoch``.

        With ``world_size`` > 1 (distributed training) ``batch_size`` is the batch of all ranks
        together: every rank draws the same order and takes its own contiguous share of each
        batch, so the ranks together see exactly the batches of one process.
        """
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        split = self.split
        if split.images is not None:
            batches = self._from_memory(generator)
        elif split.store is not None and not split.store.on_disk:
            batches = self._from_store(generator)
        else:
            batches = self._from_workers(generator)
        for images, labels, extents in batches:
            if self.full_resolution:
                yield images, labels, extents
            elif split.image_size and (
                extents is not None
                or images.shape[-1] != split.image_size
                or images.shape[-2] != split.image_size
            ):
                yield fit_batch(images, extents, split.image_size), labels
            else:
                yield images, labels

    def _to_device(
        self, images: Tensor, labels: Tensor, extents: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if self._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return (
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
            None if extents is None else extents.to(self.device, non_blocking=True),
        )

    def _index_batches(self, generator: torch.Generator) -> list[Tensor]:
        """This rank's indices of every batch of the epoch, from one seeded order."""
        n = len(self.split)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        batches = [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]
        if self.world_size == 1:
            return batches
        share = self.batch_size // self.world_size
        return [batch[self.rank * share : (self.rank + 1) * share] for batch in batches]

    def _from_memory(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, None]]:
        images = self.split.images
        assert images is not None
        for index in self._index_batches(generator):
            start = time.perf_counter()
            batch = self._to_device(images[index], self.split.labels[index])
            self.wait_seconds += time.perf_counter() - start
            yield batch[0], batch[1], None

    def _from_store(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Any]]:
        assert self.split.store is not None  # _from_store is for a split with a store
        batches = _StoreBatches(self.split.store, self.split.labels, self.decode_on_device)
        for index in self._index_batches(generator):
            start = time.perf_counter()
            batch = self._arrived(*batches[index.tolist()][:3])
            self.wait_seconds += time.perf_counter() - start
            yield batch

    def _arrived(
        self, images: Any, labels: Tensor, extents: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A batch from a store on the device; stored JPEG bytes decoded there when
        ``decode_on_device``."""
        if not self.decode_on_device:
            return self._to_device(images, labels, extents)
        encoded, lengths = images  # one tensor of the batch's JPEG bytes (_StoreBatches)
        jpegs = list(encoded.split(lengths.tolist()))
        canvas, extents = pad_batch(decode_jpegs(jpegs, self.device))
        kept = _unless_full(canvas, extents)  # extents are made on the CPU
        return (
            canvas.to(self.device),
            labels.to(self.device, non_blocking=True),
            None if kept is None else kept.to(self.device, non_blocking=True),
        )

    def _from_workers(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Any]]:
        batches = [index.tolist() for index in self._index_batches(generator)]
        store = self.split.store
        if store is not None:  # on disk: each worker reads whole batches
            loader: DataLoader = DataLoader(
                _StoreBatches(store, self.split.labels, self.decode_on_device),
                sampler=batches,
                batch_size=None,
                num_workers=self.workers,
                pin_memory=self._pin,
            )
        else:
            assert self.split.source is not None
            loader = DataLoader(
                self.split.source,
                batch_sampler=batches,
                num_workers=self.workers,
                collate_fn=_collate,
                pin_memory=self._pin,
            )
        iterator: Any = iter(loader)
        for indices in batches:  # the DataLoader yields the batches in this order
            start = time.perf_counter()
            images, labels, extents, unreadable = next(iterator)
            self._unreadable.update(indices[position] for position in unreadable)
            if not len(images):
                continue
            batch = (
                self._arrived(images, labels, extents)
                if store is not None
                else self._to_device(images, labels, extents)
            )
            self.wait_seconds += time.perf_counter() - start
            yield batch
