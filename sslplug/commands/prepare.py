"""``sslplug prepare``: decode a folder of images (or shards, or a built-in data set) once and
write it as shard files that stream fast; the writing is in :mod:`sslplug.data.write`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sslplug.errors import ConfigError
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "write a folder of images (or shards) once in a form that streams fast"
DESCRIPTION = (
    "Decode the images of DATA (an image folder, WebDataset shards, or a built-in data "
    "set) once, upright, each at its own resolution with the shorter side at most "
    "store-scale x image-size, and write them to the new folder OUT as shard files "
    "(raw pixels, or JPEG bytes with --encoding jpeg: about 6x smaller, decoded with "
    "TorchCodec when installed). Train on it with --data OUT: it is held in memory "
    "when it fits in data.cache_gb, otherwise read a batch at a time. The train and "
    "test splits are those a run on DATA would use."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("out", type=Path, metavar="OUT", help="a new (or empty) folder")
    parser.add_argument(
        "--image-size", type=int, default=0,
        help="the crop size the data is for (default: the data set's own, as data.image_size)",
    )
    parser.add_argument("--store-scale", type=float, default=1.15,
                        help="stored shorter side at most this times the image size (1.15)")
    parser.add_argument("--encoding", choices=("raw", "jpeg"), default="raw")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (2)")
    parser.add_argument("--seed", type=int, default=0, help="of the held-out test split (0)")


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    """Prepare the data; the registry is not needed (``main`` loads it for every command)."""
    import time

    from sslplug.config import DataSettings, check_seed
    from sslplug.data import check_prepare_out, prepare

    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers} must be 0 or more")
    check_seed(args.seed, "--seed")
    try:
        settings = DataSettings(
            name=args.data, image_size=args.image_size, store_scale=args.store_scale,
            workers=args.workers,
        )
    except ValueError as exc:
        message = str(exc).replace("image_size", "--image-size").replace("data.name", "DATA")
        raise ConfigError(message) from None
    check_prepare_out(args.out, args.data)  # before the data is read (write_store checks again)
    start = time.perf_counter()
    marker = prepare(settings, args.out, encoding=args.encoding, seed=args.seed)
    _print_prepared(args, marker, time.perf_counter() - start)
    return 0


def _print_prepared(args: argparse.Namespace, marker: dict, seconds: float) -> None:
    """What was written where, split by split, as the marker file of the prepared data
    records it."""
    classes = len(marker["classes"])
    labels = f"labelled ({classes} classes)" if classes else "unlabelled"
    print(
        f"prepared {args.data} for {marker['image_size']} px crops (shorter sides up to "
        f"{marker['short_side']} px, {marker['encoding']}) in {args.out} in "
        f"{seconds:.0f} s:"
    )
    for name, split in marker["splits"].items():
        count = split["images"]
        print(
            f"  {name}: {count} image{'' if count == 1 else 's'}, {labels}, "
            f"{split['bytes'] / 2**20:.1f} MiB"
        )
    print(f"  {marker['skipped']} unreadable file(s) skipped")
