"""The ``sslplug`` command: ``run`` pre-trains, ``list`` shows the installed plugins."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sslplug import __version__
from sslplug.config import COMPONENTS, load_config
from sslplug.errors import ConfigError, SslplugError
from sslplug.plugins import PluginRegistry

__all__ = ["main"]

# Plain flags and the setting each one stands for.
FLAG_SETTINGS = {
    "plugin": "components.plugin",
    "augmentation": "components.augmentation",
    "views": "components.views",
    "encoder": "components.encoder",
    "loss": "components.loss",
    "target_update": "components.target_update",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "data": "data.name",
    "backbone": "model.backbone",
    "device": "train.device",
    "seed": "train.seed",
    "out": "train.out",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslplug",
        description="Self-supervised pre-training of image encoders; every method is a plugin.",
    )
    parser.add_argument("--version", action="version", version=f"sslplug {__version__}")
    parser.add_argument(
        "--strict-plugins",
        action="store_true",
        help="fail when any installed plugin cannot be loaded, instead of leaving it out",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="pre-train an encoder",
        description=(
            "Pre-train an encoder. Settings come from defaults, then --config, then the flags, "
            "then each --set section.key=value. Without arguments: BYOL on the embedded "
            "'shapes' data, a few minutes on a CPU."
        ),
    )
    group = run.add_argument_group("components (plugin names; see `sslplug list`)")
    group.add_argument(
        "--plugin", help="plugin supplying every component not named below (default byol)"
    )
    for component in COMPONENTS:
        flag = "--" + component.replace("_", "-")
        extra = "; 'none' for no target network" if component == "target_update" else ""
        group.add_argument(
            flag, dest=component, help=f"plugin supplying the {component.replace('_', ' ')}{extra}"
        )
    common = run.add_argument_group("settings")
    common.add_argument("--config", type=Path, help="TOML file with [section] tables of settings")
    common.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set byol.tau_base=0.99 (repeatable)",
    )
    common.add_argument("--epochs", type=int, help="pre-training epochs (default 15)")
    common.add_argument("--batch-size", type=int, help="images per step (default 256)")
    common.add_argument(
        "--data", help="shapes (default), cifar10, cifar100, stl10, or an image folder"
    )
    common.add_argument("--backbone", help="small (default), resnet18, resnet34, resnet50")
    common.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    common.add_argument("--seed", type=int, help="random seed (default 0)")
    common.add_argument("--out", help="run folder (default runs/PLUGIN-TIME)")
    common.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint",
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("list", help="show installed plugins and the components each provides")
    return parser


def _assignments(args: argparse.Namespace) -> list[str]:
    out = [
        f"{setting}={getattr(args, flag)}"
        for flag, setting in FLAG_SETTINGS.items()
        if getattr(args, flag, None) is not None
    ]
    if args.no_progress:
        out.append("train.progress=false")
    return out + list(args.assignments)


def _load_registry(strict: bool) -> PluginRegistry:
    registry = PluginRegistry(strict=strict)
    registry.load_entry_points()
    return registry


def _cmd_list(registry: PluginRegistry) -> int:
    rows = [("plugin", "distribution", "version", *COMPONENTS, "settings")]
    for info in registry.info():
        marks = tuple("x" if c in info.components else "-" for c in COMPONENTS)
        rows.append(
            (
                info.name,
                info.distribution or "?",
                info.version or "?",
                *marks,
                "yes" if info.has_settings else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for failure in registry.failures:
        print(f"\nnot loaded: {failure}")
    return 0


def _cmd_run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug.engine import train

    base = None
    if args.resume is not None:
        settings_file = args.resume / "settings.toml"
        if not settings_file.is_file():
            raise ConfigError(
                f"--resume {str(args.resume)!r}: no settings.toml there; give the folder of a run "
                f"that sslplug started"
            )
        import tomllib

        base = tomllib.loads(settings_file.read_text())
    config = load_config(args.config, _assignments(args), registry.settings_classes(), base=base)
    summary = train(config, registry, resume=args.resume)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    print(f"\nrun folder: {summary['run_dir']}")
    print("components: " + ", ".join(f"{k}={v}" for k, v in summary["components"].items()))
    rows = [
        ("kNN top-1, pre-trained", summary["knn_top1"]),
        ("kNN top-1, random init", summary["knn_top1_random_init"]),
    ]
    for label, value in rows:
        if value is not None:
            print(f"{label:<24} {value:6.2f}%")
    if summary["knn_top1"] is not None and summary["knn_top1_random_init"] is not None:
        print(f"{'gain':<24} {summary['knn_top1'] - summary['knn_top1_random_init']:+6.2f} points")
    if summary["images_per_second_median"] is not None:
        print(
            f"throughput {summary['images_per_second_median']:.0f} img/s (median over epochs), "
            f"data wait {100 * summary['data_wait_share_median']:.1f}% of step time"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        registry = _load_registry(args.strict_plugins)
        if args.command == "list":
            return _cmd_list(registry)
        return _cmd_run(args, registry)
    except SslplugError as exc:
        print(f"sslplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslplug: interrupted", file=sys.stderr)
        return 130
