"""Data sets as fixed-size uint8 images, and the loader that moves them to the device.

Every data set is a ``DataSet`` with a train split (pre-training, and the kNN memory bank) and,
when labelled, a test split (kNN queries). A split that fits in memory is one uint8 tensor
``(N, C, H, W)``, decoded once; batches are slices of it. A larger image folder streams: images
are decoded and resized in DataLoader workers every epoch. Either way the loader yields uint8
batches on the device, where augmentation happens.

Sources:

* ``shapes``, the embedded default: ten classes of geometric shapes drawn procedurally, with
  colours, textures, positions, sizes and orientations that vary at random and carry no
  information about the class. No download; the same images on every machine.
* ``cifar10``, ``cifar100``, ``stl10`` through torchvision, downloaded only when asked.
* any image folder: class subfolders (labelled) or a flat folder (unlabelled), not both, with
  optional ``train/`` and ``test/`` subfolders. A folder that cannot be listed is an error
  naming it; an unreadable image or a broken link is skipped and counted.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sslplug.config import DataSettings
from sslplug.errors import DataError

__all__ = [
    "BUILTIN",
    "IMAGE_EXTENSIONS",
    "DataSet",
    "ImageFolder",
    "Loader",
    "Split",
    "load_data",
    "make_shapes",
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
    """One split: in memory (``images``) or streamed from disk (``source``)."""

    labels: Tensor
    images: Tensor | None = None
    source: Dataset | None = None

    def __len__(self) -> int:
        return len(self.labels)

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


def _decode(path: Path) -> Tensor:
    """Read an image file as uint8 RGB ``(3, H, W)``: grayscale, palette, RGBA and 16-bit too."""
    with Image.open(path) as pil:
        pil.load()
        if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
            pil = pil.point(lambda v: v / 256).convert("L")
        elif pil.mode == "F":
            pil = pil.convert("L")
        rgb = pil.convert("RGB")
        array = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return array.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _fit(image: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` and crop the centre square."""
    from torchvision.transforms.v2 import functional as F

    image = F.resize(image, size, antialias=True)
    return F.center_crop(image, [size, size])


class ImageFolder(Dataset):
    """Image files with labels; ``__getitem__`` gives ``(uint8 (3, size, size), label)``, or
    ``None`` for a file that cannot be decoded (left out of the batch, and counted)."""

    def __init__(self, files: list[Path], labels: list[int], size: int, strict: bool) -> None:
        self.files, self.labels, self.size, self.strict = files, labels, size, strict

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path = self.files[index]
        try:
            image = _decode(path)
        except Exception as exc:
            if self.strict:
                raise DataError(
                    f"cannot read image {str(path)!r}: {exc}. Remove the file, or set "
                    f"data.strict=false to skip unreadable images"
                ) from None
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None
        return _fit(image, self.size), self.labels[index]


def _collate(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, list[int]]:
    """The readable items as ``(images, labels)``, and the positions in ``items`` of the
    unreadable ones."""
    good = [item for item in items if item is not None]
    unreadable = [position for position, item in enumerate(items) if item is None]
    if not good:
        return (
            torch.empty(0, 3, 0, 0, dtype=torch.uint8),
            torch.empty(0, dtype=torch.int64),
            unreadable,
        )
    images = torch.stack([img for img, _ in good])
    return images, torch.tensor([lab for _, lab in good], dtype=torch.int64), unreadable


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
    size = settings.image_size or _first_size(files)
    lists = {"train": (files, labels)}
    if "test" in scanned and scanned["test"].files:
        lists["test"] = (scanned["test"].files, scanned["test"].labels)
    elif classes and settings.test_fraction > 0:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(len(files) * settings.test_fraction))
        held = set(order[:n_test])
        lists["test"] = ([files[i] for i in sorted(held)], [labels[i] for i in sorted(held)])
        lists["train"] = (
            [f for i, f in enumerate(files) if i not in held],
            [lab for i, lab in enumerate(labels) if i not in held],
        )

    total = sum(len(f) for f, _ in lists.values())
    in_memory = total * 3 * size * size <= settings.cache_gb * 2**30
    splits: dict[str, Split] = {}
    skipped = 0
    for name, (f, lab) in lists.items():
        source = ImageFolder(f, lab, size, settings.strict)
        if in_memory:
            images, labels_t, n_bad = _decode_all(source, settings.workers)
            skipped += n_bad
            if not len(images):
                raise DataError(f"none of the {len(f)} images under {str(root)!r} could be read")
            splits[name] = Split(images=images, labels=labels_t)
        else:
            splits[name] = Split(labels=torch.tensor(lab, dtype=torch.int64), source=source)
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s", skipped, root)
    return DataSet(
        name=str(root),
        train=splits["train"],
        test=splits.get("test") if classes else None,
        image_size=size,
        classes=classes,
        skipped=skipped + len(broken),
    )


def _first_size(files: list[Path]) -> int:
    for path in files[:50]:
        try:
            return min(_decode(path).shape[-2:])
        except Exception:
            continue
    raise DataError(f"none of the first images in {str(files[0].parent)!r} could be read")


def _decode_all(source: ImageFolder, workers: int) -> tuple[Tensor, Tensor, int]:
    loader = DataLoader(source, batch_size=256, num_workers=workers, collate_fn=_collate)
    images, labels, skipped = [], [], 0
    for batch, lab, bad in loader:
        if len(batch):
            images.append(batch)
            labels.append(lab)
        skipped += len(bad)
    if not images:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    return torch.cat(images), torch.cat(labels), skipped


def load_data(settings: DataSettings, seed: int = 0) -> DataSet:
    """Load the data set that ``settings.name`` names; raise ``DataError`` when it cannot be."""
    if settings.name == "shapes":
        return _shapes()
    if settings.name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(settings.name, settings)
    path = Path(settings.name).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a folder above it cannot be searched
        raise DataError(
            f"cannot reach data {settings.name!r}: {exc.strerror or exc} (a folder on the way "
            f"to it cannot be searched by the user running sslplug)"
        ) from None
    if not exists:
        raise DataError(
            f"data {settings.name!r} is neither a built-in data set ({', '.join(BUILTIN)}) "
            f"nor an existing folder"
        )
    if not is_dir:
        raise DataError(f"data {settings.name!r} is a file; give a folder of images")
    return _image_folder(settings, seed)


# ------------------------------------------------------------------------------------------
# the loader


class Loader:
    """Yields ``(uint8 images, labels)`` batches on ``device``, and measures waiting for them.

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
    ) -> None:
        self.split, self.batch_size, self.device = split, batch_size, device
        self.max_batches = max_batches
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.seed, self.workers = shuffle, drop_last, seed, workers
        self.wait_seconds = 0.0
        self._unreadable: set[int] = set()  # indices into the split's source
        self._pin = device.type == "cuda"

    @property
    def skipped(self) -> int:
        """Files of a streamed split that could not be decoded, so far (see the class)."""
        return len(self._unreadable)

    def __len__(self) -> int:
        n = len(self.split)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of one epoch; the order depends only on the seed and ``epoch``.

        With ``world_size`` > 1 (distributed training) ``batch_size`` is the batch of all ranks
        together: every rank draws the same order and takes its own contiguous share of each
        batch, so the ranks together see exactly the batches of one process.
        """
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.split.images is not None:
            yield from self._from_memory(generator)
        else:
            yield from self._from_workers(generator)

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return (
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
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

    def _from_memory(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        images = self.split.images
        assert images is not None
        for index in self._index_batches(generator):
            start = time.perf_counter()
            batch = self._to_device(images[index], self.split.labels[index])
            self.wait_seconds += time.perf_counter() - start
            yield batch

    def _from_workers(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        batches = [index.tolist() for index in self._index_batches(generator)]
        assert self.split.source is not None  # a split without images is streamed
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
            images, labels, unreadable = next(iterator)
            self._unreadable.update(indices[position] for position in unreadable)
            if not len(images):
                continue
            batch = (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )
            self.wait_seconds += time.perf_counter() - start
            yield batch
