"""``sslplug run``: pre-train an encoder, a new run or one resumed from its last checkpoint."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from sslplug.config import COMPONENTS, MovedSettingWarning, RunConfig, load_config, read_toml
from sslplug.errors import ConfigError
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "FLAG_SETTINGS", "HELP", "add_arguments", "assignments", "run"]

HELP = "pre-train an encoder"
DESCRIPTION = (
    "Pre-train an encoder. Settings come from defaults, then --config, then the flags, "
    "then each --set section.key=value. Without arguments: BYOL on the embedded "
    "'shapes' data, a few minutes on a CPU."
)

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
    "extend": "train.extend",
}

# printed when --no-progress is given: --disable progress is the one way to switch it off
NO_PROGRESS_DEPRECATED = (
    "sslplug: warning: --no-progress is deprecated and will be removed; use --disable progress "
    "instead"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_components(parser)
    _add_settings(parser)


def _add_components(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("components (plugin names; see `sslplug list`)")
    group.add_argument(
        "--plugin", help="plugin supplying every component not named below (default byol)"
    )
    for component in COMPONENTS:
        flag = "--" + component.replace("_", "-")
        extra = "; 'none' for no target network" if component == "target_update" else ""
        group.add_argument(
            flag, dest=component, help=f"plugin supplying the {component.replace('_', ' ')}{extra}"
        )


def _add_settings(parser: argparse.ArgumentParser) -> None:
    common = parser.add_argument_group("settings")
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
    common.add_argument(
        "--backbone",
        help="small (default), resnet18, resnet34, resnet50, vit_micro, vit_tiny, vit_small, "
        "or timm:NAME for any timm model",
    )
    common.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    common.add_argument("--seed", type=int, help="random seed (default 0)")
    common.add_argument("--out", help="run folder (default runs/PLUGIN-TIME)")
    _add_resume_options(common)
    common.add_argument(
        "--no-progress",
        action="store_true",
        help="deprecated: the same as --disable progress, which replaces it",
    )
    common.add_argument(
        "--disable",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="switch a lifecycle plugin off for this run: tensorboard, progress (the bar; the "
        "epoch lines stay), knn, health, view_grid, or an installed one (repeatable; also "
        "`disable = [...]` under [train])",
    )


def _add_resume_options(common: argparse._ArgumentGroup) -> None:
    """``--resume`` and the options that say how a run continues or starts over."""
    common.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, with its own settings "
        "(a run stopped before its first checkpoint starts over)",
    )
    common.add_argument(
        "--extend",
        choices=["restart", "continue"],
        help="--resume with more --epochs than planned: restart (the default, since a finished "
        "schedule has nothing left to teach) adds a new cycle over the added epochs, the "
        "learning rate warming up again and decaying to optim.lr_floor; continue keeps the "
        "planned schedules and holds their end values (with the default floor of 0 the added "
        "epochs train at a learning rate of 0); saved as train.extend",
    )
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one: delete that run's checkpoint, "
        "settings, summary, views and TensorBoard logs first",
    )
    common.add_argument(
        "--ignore-collapse",
        action="store_true",
        help="with --resume: continue a run that train.stop_on_collapse stopped because its "
        "embeddings collapsed (without it, such a resume is refused); the run then no longer "
        "stops for collapse (train.stop_on_collapse=false is saved with it), and the health "
        "monitor still warns after every epoch it finds collapsed",
    )


def assignments(args: argparse.Namespace) -> list[str]:
    """The ``section.key=value`` settings the flags stand for, then those of each ``--set``."""
    out = [
        f"{setting}={getattr(args, flag)}"
        for flag, setting in FLAG_SETTINGS.items()
        if getattr(args, flag, None) is not None
    ]
    return out + list(args.assignments)


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug import distributed
    from sslplug.engine import train

    if args.no_progress:
        print(NO_PROGRESS_DEPRECATED, file=sys.stderr)
        args.disable = [*args.disable, "progress"]
    config = _settings(args, registry)
    try:
        if args.overwrite:
            summary = train(config, registry, overwrite=True)
        else:
            summary = train(
                config, registry, resume=args.resume, ignore_collapse=args.ignore_collapse
            )
        is_main = distributed.is_main()
    finally:
        distributed.stop()
    if is_main:
        _print_summary(summary)
    return 0


def _settings(args: argparse.Namespace, registry: PluginRegistry) -> RunConfig:
    """The run's settings: the resumed run's own (with ``--resume``) or the defaults, then
    ``--config``, the flags and each ``--set``; ``--disable`` adds to the plugins switched off."""
    base = None
    if args.ignore_collapse and args.resume is None:
        raise ConfigError(
            "--ignore-collapse continues a run that stopped because its embeddings collapsed: "
            "give it with --resume RUN_DIR (a new run stops for collapse only with "
            "--set train.stop_on_collapse=true)"
        )
    if args.resume is not None:
        _check_resume_flags(args)
        settings_file = args.resume / "settings.toml"
        if not settings_file.is_file():
            raise ConfigError(
                f"--resume {str(args.resume)!r}: no settings.toml there; give the folder of a run "
                f"that sslplug started"
            )
        base = read_toml(settings_file, "the run's settings")
    config = _load(args, registry, base)
    if base is not None:
        _check_same_components(args.resume, base, config.components)
    registry.resolve(config, _component_options(args))  # an unknown plugin, named as typed
    # --disable adds to the names the config file or the resumed run switched off
    config.train.disable = tuple(dict.fromkeys([*config.train.disable, *args.disable]))
    return config


def _load(args: argparse.Namespace, registry: PluginRegistry, base: Any) -> RunConfig:
    """``load_config`` of the command line; a setting under an old name is one line on stderr,
    ``sslplug: warning: ...`` naming the new one (``MovedSettingWarning``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MovedSettingWarning)
        config = load_config(args.config, assignments(args), registry.settings_classes(), base)
    for warning in caught:
        if issubclass(warning.category, MovedSettingWarning):
            print(f"sslplug: warning: {warning.message}", file=sys.stderr)
        else:  # not ours: as it would have been without the catch
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return config


def _component_options(args: argparse.Namespace) -> dict[str, str]:
    """How the command line named the plugin of each key of ``[components]`` (``--loss X``,
    ``--set components.loss=X``; the last one given wins, as in ``load_config``), which the
    messages about a plugin name repeat."""
    named = {
        key: f"--{key.replace('_', '-')} {getattr(args, key)}"
        for key in ("plugin", *COMPONENTS)
        if getattr(args, key, None) is not None
    }
    for text in args.assignments:
        section, _, key = text.split("=", 1)[0].partition(".")
        if section.strip() == "components":
            named[key.strip()] = f"--set {text}"
    return named


def _check_resume_flags(args: argparse.Namespace) -> None:
    """A resumed run continues in its own folder: no --out elsewhere, no --overwrite."""
    if args.overwrite:
        raise ConfigError(
            f"--resume {str(args.resume)!r} continues that run and --overwrite starts one over; "
            f"give one of them"
        )
    if args.out is not None and Path(args.out).resolve() != args.resume.resolve():
        raise ConfigError(
            f"--out {args.out!r} with --resume {str(args.resume)!r}: a resumed run continues in "
            f"its own folder, {str(args.resume)!r}; leave out --out (or, for a new run in "
            f"{args.out!r}, leave out --resume)"
        )


def _check_same_components(run_dir: Path, saved: dict[str, Any], asked: Any) -> None:
    """A resumed run keeps the components it was trained with; refuse flags or settings that
    ask for others, rather than continuing with the saved ones regardless."""
    trained = saved.get("components", {})
    differences = [
        f"{name} {trained[name]!r} (asked: {getattr(asked, name)!r})"
        for name in ("plugin", *COMPONENTS)
        if name in trained and trained[name] != getattr(asked, name)
    ]
    if differences:
        raise ConfigError(
            f"--resume {str(run_dir)!r}: the run was trained with {', '.join(differences)}; a "
            f"resumed run keeps its components: leave out the component flags, or start a new "
            f"run with those components and another --out"
        )


def _print_summary(summary: dict) -> None:
    print(f"\nrun folder: {summary['run_dir']}")
    print("components: " + ", ".join(f"{k}={v}" for k, v in summary["components"].items()))
    start = "random init" if not summary.get("pretrained") else "at the start"
    rows = [
        ("kNN top-1, pre-trained", summary["knn_top1"]),
        (f"kNN top-1, {start}", summary["knn_top1_random_init"]),
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
