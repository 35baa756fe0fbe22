"""``sslplug bench``: images per second of view generation and of the training step, against
the per-image torchvision pipeline; the measuring is in :mod:`sslplug.bench`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sslplug.bench import BenchSettings
from sslplug.errors import ConfigError
from sslplug.plugins import PluginRegistry

__all__ = ["HELP", "add_arguments", "run"]

HELP = (
    "images per second of view generation and of the training step, against the "
    "per-image torchvision pipeline"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    b = BenchSettings()
    parser.add_argument("--plugin", default=b.plugin, help=f"method (default {b.plugin})")
    parser.add_argument("--backbone", default=b.backbone, help=f"default {b.backbone}")
    parser.add_argument(
        "--batch-size", type=int, default=b.batch_size, help=f"default {b.batch_size}"
    )
    parser.add_argument(
        "--image-size", type=int, default=b.image_size, help=f"default {b.image_size}"
    )
    parser.add_argument("--device", default=b.device, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default=b.precision, help="auto (default), bf16, fp32")
    parser.add_argument(
        "--workers", type=int, default=b.workers, help=f"baseline DataLoader workers ({b.workers})"
    )
    parser.add_argument(
        "--steps", type=int, default=b.steps, help=f"batches per repeat ({b.steps})"
    )
    parser.add_argument(
        "--warmup", type=int, default=b.warmup, help=f"untimed batches ({b.warmup})"
    )
    parser.add_argument("--repeats", type=int, default=b.repeats, help=f"default {b.repeats}")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-image baseline")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's peak TFLOP/s at this precision, to report the share achieved",
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any run setting, e.g. --set byol.projection_dim=128",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoder and target update, as train.compile does; the compile "
        "time is reported apart",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    import json

    from sslplug.bench import format_bench, run_bench

    if args.plugin not in registry.names():
        raise registry.unknown_plugin(args.plugin, f"--plugin {args.plugin}")
    settings = _settings(args)
    results = run_bench(settings, registry)
    print(format_bench(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _settings(args: argparse.Namespace) -> BenchSettings:
    """The flags as bench settings, once each number is known to be in range."""
    for name in ("batch_size", "image_size", "steps", "repeats"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    for name in ("warmup", "workers"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} {getattr(args, name)} must be 0 or more")
    return BenchSettings(
        compile=args.compile,
        plugin=args.plugin,
        backbone=args.backbone,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        baseline=not args.no_baseline,
        peak_tflops=args.peak_tflops,
        assignments=tuple(args.assignments),
    )
