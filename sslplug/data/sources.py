"""Where data comes from: the data sets chosen by name, and the paths ``load_data`` reads.

``data.name`` is the name of a data set in ``SOURCES`` or a path:

* ``shapes``, the embedded default (``sslplug.data.shapes``), and ``cifar10``, ``cifar100``,
  ``stl10`` through torchvision, downloaded only when asked. Plugins add names with
  ``register_source``; ``SOURCES`` is the one table that loading, the messages listing the
  valid names and ``sslplug prepare`` read.
* a folder written by ``sslplug prepare`` (``sslplug.data.store``), told by its marker file;
* WebDataset shards: a ``.tar`` file, or a folder of them (``sslplug.data.shards``);
* any other folder of images (``sslplug.data.folder``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from torch import Tensor

from sslplug.config import DataSettings
from sslplug.data.decode import stored_side
from sslplug.data.folder import load_folder, unreadable_folder
from sslplug.data.shapes import load_shapes
from sslplug.data.shards import load_shards, shard_files
from sslplug.data.split import DataSet, Split
from sslplug.data.store import STORE_MARKER, read_store
from sslplug.errors import DataError, PluginError

__all__ = ["BUILTIN", "PATHS", "SOURCES", "Builder", "Source", "load_data", "register_source"]

log = logging.getLogger(__name__)

# builder(settings, seed) -> DataSet: see register_source
Builder = Callable[[DataSettings, int], DataSet]


@attrs.frozen
class Source:
    """A data set chosen by name: the function that builds it, and a line saying what it is
    (for listings)."""

    builder: Builder
    description: str


def _torchvision(settings: DataSettings, seed: int) -> DataSet:
    """CIFAR-10, CIFAR-100 or STL-10 (``settings.name``) from ``data.root``, downloaded there
    with ``data.download``; resized to ``data.image_size`` when one is set."""
    import torchvision.datasets  # loaded when asked for: it takes seconds

    name = settings.name
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


# the data sets chosen by name (data.name); plugins add theirs with register_source
SOURCES: dict[str, Source] = {
    "shapes": Source(load_shapes, "the embedded default: ten classes of geometric shapes"),
    "cifar10": Source(_torchvision, "CIFAR-10 through torchvision: 10 classes, 32 px"),
    "cifar100": Source(_torchvision, "CIFAR-100 through torchvision: 100 classes, 32 px"),
    "stl10": Source(_torchvision, "STL-10 through torchvision: 10 classes, 96 px"),
}
BUILTIN = tuple(SOURCES)  # the data sets sslplug itself names
# what else data.name may be, for messages listing the valid names
PATHS = (
    "the path of an image folder, of a folder written by sslplug prepare, or of WebDataset "
    "shards (.tar)"
)


def register_source(name: str, builder: Builder, description: str) -> None:
    """Make ``data.name = name`` load the data set that ``builder`` builds.

    ``builder(settings, seed)`` is called each time the data is loaded (a run, ``sslplug
    prepare``, ``eval``), with the ``DataSettings`` (``settings.name`` is ``name``; it may read
    ``root``, ``download``, ``image_size`` and the rest) and the run's seed (for a test split
    held out at random). It returns a ``DataSet``: a train split and, when labelled, a test
    split, each ``Split(labels, images=...)`` with uint8 images ``(N, 3, S, S)`` and int64
    labels (-1 when unlabelled), or images of their own sizes (``store``, ``source``); and its
    ``image_size``. It raises ``DataError`` saying what to do when the data cannot be had.
    ``description`` is one line saying what the data set is. A name already taken is refused
    (``PluginError``): a plugin cannot replace a data set.
    """
    if name in SOURCES:
        raise PluginError(f"the data set name {name!r} is taken already; give another name")
    SOURCES[name] = Source(builder, description)


def load_data(settings: DataSettings, seed: int = 0) -> DataSet:
    """Load the data set that ``settings.name`` names; raise ``DataError`` when it cannot be."""
    source = SOURCES.get(settings.name)
    if source is not None:
        return source.builder(settings, seed)
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
            f"data {settings.name!r} is neither a built-in data set ({', '.join(SOURCES)}) "
            f"nor an existing folder"
        )
    try:
        prepared = is_dir and (path / STORE_MARKER).is_file()
        shards = shard_files(path) if path.suffix == ".tar" or is_dir else None
    except OSError as exc:
        raise unreadable_folder(path, path, exc) from None
    if prepared:
        return _prepared(path, settings)
    if shards:
        return load_shards(path, shards, settings, seed)
    if not is_dir:
        raise DataError(
            f"data {settings.name!r} is a file; give a folder of images, a folder written by "
            f"sslplug prepare, or WebDataset shards (.tar)"
        )
    return load_folder(settings, seed)


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
