"""Data sets as uint8 images, and the loader that moves them to the device.

Every data set is a ``DataSet`` with a train split (pre-training, and the kNN memory bank) and,
when labelled, a test split (kNN queries). Built-in data sets are one uint8 tensor
``(N, C, S, S)`` per split. Images of a folder, of prepared data or of shards keep a resolution
of their own: in memory when they fit in ``data.cache_gb``, otherwise read a batch at a time in
DataLoader workers (prepared data: raw pixels or JPEG bytes from shard files; a folder: decoded
from its files every epoch). The loader yields uint8 batches on the device, where augmentation
happens.

The modules, each importing only those before it:

* ``crops``: random resized crops of images at their stored resolution, on the device;
* ``decode``: decoding an image at a bounded side, padded batches, packed worker batches;
* ``store``: ``ImageStore`` (images of their own sizes, in memory or in shard files) and reading
  a folder written by ``sslplug prepare``;
* ``loader``: ``Loader``;
* ``split``: ``DataSet`` and ``Split``, and the three ways a split holds its images;
* ``shapes``, ``folder``, ``shards``: the embedded default, image folders, WebDataset shards;
* ``sources``: the table of data sets chosen by name (``SOURCES``, ``register_source``) and
  ``load_data``;
* ``write``: ``sslplug prepare`` (``prepare``, ``write_store``).

This module re-exports the names the rest of sslplug uses.
"""

from __future__ import annotations

from sslplug.data.crops import (
    RandomResizedCrop,
    center_boxes,
    fit_batch,
    resized_crops,
    sample_boxes,
    upright,
)
from sslplug.data.decode import MAX_ASPECT, decode_image, decode_jpegs, pad_batch, stored_side
from sslplug.data.folder import IMAGE_EXTENSIONS, ImageFolder
from sslplug.data.loader import Loader
from sslplug.data.shapes import SHAPE_CLASSES, make_shapes
from sslplug.data.shards import MAX_CLASSES, ShardSamples
from sslplug.data.sources import (
    BUILTIN,
    PATHS,
    SOURCES,
    Builder,
    Source,
    load_data,
    register_source,
)
from sslplug.data.split import DataSet, Split
from sslplug.data.store import STORE_MARKER, Encoding, ImageStore, read_store
from sslplug.data.write import PREPARE_LOCK, check_prepare_out, prepare, write_store

__all__ = [
    "BUILTIN",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT",
    "MAX_CLASSES",
    "PATHS",
    "PREPARE_LOCK",
    "SHAPE_CLASSES",
    "SOURCES",
    "STORE_MARKER",
    "Builder",
    "DataSet",
    "Encoding",
    "ImageFolder",
    "ImageStore",
    "Loader",
    "RandomResizedCrop",
    "ShardSamples",
    "Source",
    "Split",
    "center_boxes",
    "check_prepare_out",
    "decode_image",
    "decode_jpegs",
    "fit_batch",
    "load_data",
    "make_shapes",
    "pad_batch",
    "prepare",
    "read_store",
    "register_source",
    "resized_crops",
    "sample_boxes",
    "stored_side",
    "upright",
    "write_store",
]
