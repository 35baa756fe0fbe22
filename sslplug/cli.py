"""The ``sslplug`` command: ``run`` pre-trains, ``eval`` and ``finetune`` measure what a run
learned with few labels, ``export`` writes its backbone, ``list`` shows the installed plugins."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sslplug import __version__
from sslplug.bench import BenchSettings
from sslplug.config import COMPONENTS, load_config, read_toml
from sslplug.errors import ConfigError, OutputError, SslplugError
from sslplug.finetune import FinetuneSettings
from sslplug.plugins import PluginRegistry

if TYPE_CHECKING:
    from sslplug.pretrained import Run
    from sslplug.rundir import RunFolder

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

# what eval and finetune do with their results, and when saving them fails
_RECORDED = (
    "The results are printed, then appended to the run's summary.json (under 'evaluations', "
    "where they stay when the run is resumed) and its TensorBoard log. When the run folder "
    "cannot be written, the printed table is all there is of them: sslplug says what could not "
    "be saved and exits with status 2. The command holds the run folder's lock while it works: "
    "on a folder where a run is training it stops at once, naming that run."
)


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
    common.add_argument(
        "--backbone",
        help="small (default), resnet18, resnet34, resnet50, vit_micro, vit_tiny, vit_small, "
        "or timm:NAME for any timm model",
    )
    common.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    common.add_argument("--seed", type=int, help="random seed (default 0)")
    common.add_argument("--out", help="run folder (default runs/PLUGIN-TIME)")
    common.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, with its own settings "
        "(a run stopped before its first checkpoint starts over)",
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
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument(
        "--disable",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="switch a lifecycle plugin off for this run: tensorboard, progress, knn, view_grid, "
        "or an installed one (repeatable; also `disable = [...]` under [train])",
    )

    sub.add_parser("list", help="show installed plugins and the components each provides")
    new = sub.add_parser(
        "new-plugin",
        help="write a ready-to-install package for a new method or component",
        description=(
            "Write sslplug-NAME/: pyproject.toml with the entry point, sslplug_NAME.py with "
            "working hook implementations to replace, a test, a README. `pip install -e` it "
            "and `sslplug list` shows it."
        ),
    )
    new.add_argument("name", metavar="NAME")
    new.add_argument(
        "--component",
        action="append",
        default=[],
        choices=COMPONENTS,
        help="a component the plugin provides (repeatable; default: all five)",
    )
    new.add_argument("--dir", type=Path, default=Path("."), help="where to write it (default .)")
    info = sub.add_parser(
        "info", help="one plugin: its distribution, components, and settings with their defaults"
    )
    info.add_argument("name", metavar="PLUGIN")
    _add_downstream(sub)
    return parser


def _add_downstream(sub: argparse._SubParsersAction) -> None:
    def source_and_data(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT")
        parser.add_argument(
            "--data", help="labelled data to evaluate on (default: the run's pre-training data)"
        )
        parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
        parser.add_argument(
            "--set",
            dest="assignments",
            action="append",
            default=[],
            metavar="data.KEY=VALUE",
            help="override a data setting, e.g. --set data.image_size=32 (repeatable)",
        )

    def labels(parser: argparse.ArgumentParser, default: list[str]) -> None:
        shown = " ".join(default).replace("%", "%%")  # argparse formats help with %
        parser.add_argument(
            "--labels",
            action="append",
            metavar="BUDGET",
            help=(
                "labelled train images to use: a percentage (1%%, 10%%), a count per class "
                f"(25) or all; repeatable (default: {shown})"
            ),
        )
        parser.add_argument(
            "--label-seed", type=int, default=0, help="seed of the label subset (default 0)"
        )
        parser.add_argument(
            "--baseline",
            action="store_true",
            help="also evaluate the run's random initialisation, the same way",
        )

    ev = sub.add_parser(
        "eval",
        help="kNN and linear probe on frozen features, with all or a few labels; label-free "
        "health measures on any data",
        description=(
            "Weighted kNN and a linear probe (L-BFGS logistic regression, L2 penalty chosen on "
            "a held-out fifth) on the frozen features of a run's encoder, when the data has "
            "labels; and, labelled or not, the label-free measures of the health monitor "
            "(effective rank, spread, alignment, uniformity; docs/health.md) on the run's fixed "
            "sample of training images."
        ),
        epilog=_RECORDED,
    )
    source_and_data(ev)
    labels(ev, ["all"])

    ft = sub.add_parser(
        "finetune",
        help="fine-tune the encoder and a linear head on a few labels; report test accuracy",
        description=(
            "Fine-tune the whole encoder plus a linear classifier on a class-balanced subset of "
            "the labels. --baseline trains the same from the run's random initialisation: "
            "supervised training from scratch on the same labels."
        ),
        epilog=_RECORDED,
    )
    source_and_data(ft)
    labels(ft, ["1%"])
    defaults = FinetuneSettings()
    ft.add_argument("--steps", type=int, default=defaults.steps, help=f"default {defaults.steps}")
    ft.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}"
    )
    ft.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"AdamW for the head, default {defaults.lr}"
    )
    ft.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=defaults.backbone_lr_scale,
        help=f"the encoder's learning rate relative to the head's (default "
        f"{defaults.backbone_lr_scale})",
    )
    ft.add_argument(
        "--layer-decay",
        type=float,
        default=defaults.layer_decay,
        help="layer-wise learning-rate decay: each backbone layer learns at this times the rate "
        f"of the layer above (MAE fine-tunes ViT-B with 0.65; default {defaults.layer_decay}: off)",
    )
    ft.add_argument(
        "--no-probe-first",
        action="store_true",
        help="start from a zero head instead of the linear probe of the frozen features",
    )

    ex = sub.add_parser(
        "export",
        help="write the backbone as a plain state dict (and a JSON note of its settings)",
        description=(
            "Write the backbone of a run's encoder to OUT.pt as a plain state dict, and a note "
            "of its settings and of how to load it to OUT.json (OUT.pt with the suffix .json, so "
            "OUT.pt may not end in .json). Both are written whole or not at all. An existing "
            "file is replaced only with --force; an sslplug checkpoint or a file of the run "
            "(last.pt, settings.toml, summary.json) never is."
        ),
    )
    ex.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT")
    ex.add_argument("out", metavar="OUT.pt", help="the file to write (not a folder)")
    ex.add_argument(
        "--force",
        action="store_true",
        help="replace OUT.pt and OUT.json if they exist (never a checkpoint or a file of the run)",
    )

    prep = sub.add_parser(
        "prepare",
        help="write a folder of images (or shards) once in a form that streams fast",
        description=(
            "Decode the images of DATA (an image folder, WebDataset shards, or a built-in data "
            "set) once, upright, each at its own resolution with the shorter side at most "
            "store-scale x image-size, and write them to the new folder OUT as shard files "
            "(raw pixels, or JPEG bytes with --encoding jpeg: about 6x smaller, decoded with "
            "TorchCodec when installed). Train on it with --data OUT: it is held in memory "
            "when it fits in data.cache_gb, otherwise read a batch at a time. The train and "
            "test splits are those a run on DATA would use."
        ),
    )
    prep.add_argument("data", metavar="DATA")
    prep.add_argument("out", type=Path, metavar="OUT", help="a new (or empty) folder")
    prep.add_argument(
        "--image-size", type=int, default=0,
        help="the crop size the data is for (default: the data set's own, as data.image_size)",
    )
    prep.add_argument("--store-scale", type=float, default=1.15,
                      help="stored shorter side at most this times the image size (1.15)")
    prep.add_argument("--encoding", choices=("raw", "jpeg"), default="raw")
    prep.add_argument("--workers", type=int, default=2, help="decoding processes (2)")
    prep.add_argument("--seed", type=int, default=0, help="of the held-out test split (0)")

    bench = sub.add_parser(
        "bench",
        help="images per second of view generation and of the training step, against the "
        "per-image torchvision pipeline",
    )
    b = BenchSettings()
    bench.add_argument("--plugin", default=b.plugin, help=f"method (default {b.plugin})")
    bench.add_argument("--backbone", default=b.backbone, help=f"default {b.backbone}")
    bench.add_argument(
        "--batch-size", type=int, default=b.batch_size, help=f"default {b.batch_size}"
    )
    bench.add_argument(
        "--image-size", type=int, default=b.image_size, help=f"default {b.image_size}"
    )
    bench.add_argument("--device", default=b.device, help="auto (default), cpu, cuda, cuda:N")
    bench.add_argument("--precision", default=b.precision, help="auto (default), bf16, fp32")
    bench.add_argument(
        "--workers", type=int, default=b.workers, help=f"baseline DataLoader workers ({b.workers})"
    )
    bench.add_argument("--steps", type=int, default=b.steps, help=f"batches per repeat ({b.steps})")
    bench.add_argument("--warmup", type=int, default=b.warmup, help=f"untimed batches ({b.warmup})")
    bench.add_argument("--repeats", type=int, default=b.repeats, help=f"default {b.repeats}")
    bench.add_argument("--no-baseline", action="store_true", help="skip the per-image baseline")
    bench.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's peak TFLOP/s at this precision, to report the share achieved",
    )
    bench.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any run setting, e.g. --set byol.projection_dim=128",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoder and target update, as train.compile does; the compile "
        "time is reported apart",
    )
    bench.add_argument("--out", type=Path, help="write the results as JSON here")


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
    rows: list[tuple[str, ...]] = [("plugin", "distribution", "version", *COMPONENTS, "settings")]
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
    print(
        f"\ncore lifecycle plugins (switch one off with --disable NAME): "
        f"{', '.join(registry.internal_names())}"
    )
    return 0


def _cmd_new_plugin(args: argparse.Namespace) -> int:
    from sslplug.scaffold import write_plugin

    folder = write_plugin(args.name, args.component, args.dir)
    print(f"wrote {folder}/; next: pip install -e '{folder}[test]' && sslplug list")
    return 0


def _cmd_info(args: argparse.Namespace, registry: PluginRegistry) -> int:
    import inspect

    entry = next((i for i in registry.info() if i.name == args.name), None)
    if entry is None:
        raise ConfigError(
            f"no plugin named {args.name!r}; installed: {', '.join(registry.names()) or '(none)'}"
        )
    module = registry.pm.get_plugin(args.name)
    print(f"{entry.name}: from {entry.distribution or '?'} {entry.version or '?'}")
    doc = inspect.getdoc(module)
    if doc:
        print("\n" + doc.split("\n\n")[0])
    print(f"\ncomponents: {', '.join(entry.components) or '(none)'}")
    capabilities = registry.capabilities_of(args.name)
    if capabilities:
        print("capabilities it registers:")
        for capability in capabilities:
            print(f"  {capability.name}: {capability.description}")
    settings = registry.settings_classes().get(args.name)
    if settings is None:
        print("settings: none")
        return 0
    print(f"settings ([{args.name}] in a TOML file, or --set {args.name}.KEY=VALUE):")
    settings_doc = inspect.getdoc(settings)
    if settings_doc:
        print("  " + settings_doc.split("\n\n")[0].replace("\n", "\n  "))
    for field in attrs.fields(settings):
        # attrs' stubs declare Factory a function (it pretends to return the value it makes)
        is_factory = isinstance(field.default, attrs.Factory)  # type: ignore[arg-type]
        default = field.default.factory() if is_factory else field.default
        kind = getattr(field.type, "__name__", None) or str(field.type)
        print(f"  {field.name} = {default!r}  ({kind})")
    return 0


def _cmd_run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug.engine import train

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
    config = load_config(args.config, _assignments(args), registry.settings_classes(), base=base)
    if base is not None:
        _check_same_components(args.resume, base, config.components)
    # --disable adds to the names the config file or the resumed run switched off
    config.train.disable = tuple(dict.fromkeys([*config.train.disable, *args.disable]))
    from sslplug import distributed

    try:
        if args.overwrite:
            summary = train(config, registry, overwrite=True)
        else:
            summary = train(
                config, registry, resume=args.resume, ignore_collapse=args.ignore_collapse
            )
        main = distributed.is_main()
    finally:
        distributed.stop()
    if main:
        _print_summary(summary)
    return 0


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


def _open_run(args: argparse.Namespace, registry: PluginRegistry) -> tuple[Any, Any, Any]:
    from sslplug.data import load_data
    from sslplug.engine import resolve_device
    from sslplug.pretrained import load_run

    run = load_run(args.source, registry)
    assignments = [a if a.startswith("data.") else f"data.{a}" for a in args.assignments]
    if args.data is not None:
        assignments.append(f"data.name={args.data}")
    data_settings = load_config(
        None, assignments, registry.settings_classes(), base={"data": attrs.asdict(run.config.data)}
    ).data
    trained_size = run.state.get("image_size")
    is_folder = data_settings.name not in ("shapes", "cifar10", "cifar100", "stl10")
    if is_folder and trained_size and not data_settings.image_size:
        data_settings = attrs.evolve(data_settings, image_size=trained_size)
    data = load_data(data_settings, seed=run.config.train.seed)
    return run, data, resolve_device(args.device)


def _budgets(args: argparse.Namespace, default: str) -> list[Any]:
    from sslplug.evaluate import parse_labels

    if not 0 <= args.label_seed < 2**32:
        raise ConfigError(
            f"--label-seed {args.label_seed} must be a whole number from 0 to {2**32 - 1}"
        )
    return [parse_labels(text) for text in (args.labels or [default])]


def _encoders(args: argparse.Namespace, registry: PluginRegistry, run: Any, data: Any, device: Any):
    from sslplug.pretrained import build_encoder

    inits = ["pre-trained", "random init"] if args.baseline else ["pre-trained"]
    for init in inits:
        yield (
            init,
            build_encoder(
                run,
                registry,
                data.image_size,
                data.num_classes,
                device,
                pretrained=init == "pre-trained",
            ),
        )


def _cmd_eval(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug.downstream import (
        format_health,
        format_table,
        frozen_evaluation,
        health_evaluation,
    )
    from sslplug.pretrained import build_views

    budgets = _budgets(args, "all")
    with _lock_run_folder(args.source, "eval"):  # after the cheap checks, before any work
        run, data, device = _open_run(args, registry)  # it decodes the data
        labelled = data.test is not None and data.test.labelled and data.train.labelled
        views = build_views(run, registry, data.image_size, data.num_classes, device)
        rows, health = [], []
        for init, encoder in _encoders(args, registry, run, data, device):
            health.append(
                health_evaluation(
                    encoder, views, data, device, init,
                    samples=run.config.eval.health_samples or 1024, seed=run.config.train.seed,
                )
            )
            if labelled:
                rows += frozen_evaluation(
                    encoder,
                    data,
                    budgets,
                    device,
                    init,
                    seed=args.label_seed,
                    knn_k=run.config.eval.knn_k,
                    knn_temperature=run.config.eval.knn_temperature,
                )
        print(
            f"{run.run_dir} ({', '.join(f'{k}={v}' for k, v in run.components.items())}), "
            f"epoch {run.epoch}, on {data.name}:"
        )
        if rows:
            print(format_table(rows))
        else:
            print(
                f"{data.name} has no labelled train and test splits: no kNN accuracy or linear "
                f"probe can be computed without labels; the label-free measures follow"
            )
        print("label-free health (docs/health.md):")
        print(format_health(health))
        _record(run, rows + health)
    return 0


def _cmd_finetune(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug.downstream import finetune_evaluation, format_table

    for name in ("steps", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    if not args.lr > 0 or args.lr == float("inf"):
        raise ConfigError(f"--lr {args.lr} must be a positive, finite number")
    if not 0 < args.backbone_lr_scale <= 1:
        raise ConfigError(
            f"--backbone-lr-scale {args.backbone_lr_scale} must be in (0, 1]: the encoder "
            f"learns at that share of the head's rate"
        )
    if not 0 < args.layer_decay <= 1:
        raise ConfigError(
            f"--layer-decay {args.layer_decay} must be in (0, 1]: each layer learns at that "
            f"share of the rate of the layer above (1: no decay)"
        )
    budgets = _budgets(args, "1%")
    with _lock_run_folder(args.source, "finetune"):  # after the cheap checks, before any work
        run, data, device = _open_run(args, registry)  # it decodes the data
        settings = FinetuneSettings(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.label_seed,
            backbone_lr_scale=args.backbone_lr_scale,
            probe_first=not args.no_probe_first,
            layer_decay=args.layer_decay,
        )
        rows = []
        for init, encoder in _encoders(args, registry, run, data, device):
            rows += finetune_evaluation(encoder, data, budgets, device, init, settings)
        print(f"{run.run_dir} fine-tuned for {settings.steps} steps on {data.name}:")
        print(format_table(rows))
        _record(run, rows)
    return 0


def _lock_run_folder(source: Path, command: str) -> RunFolder:
    """The folder of the run ``source`` names (a run folder, or a checkpoint file in one),
    locked for ``command`` while it reads the run and adds its results there (``with``
    releases it): refused at once, naming the holder, while a run works in it."""
    from sslplug.rundir import RunFolder

    folder = RunFolder(source if source.is_dir() else source.parent)
    folder.lock_to_add(command)
    return folder


def _record(run: Run, rows: list[dict[str, Any]]) -> None:
    """Save the results just printed in the run folder, each with the epoch of the checkpoint
    measured (they stay there when the run is resumed); when that fails, say that the printed
    table is all there is of them (``main`` then exits with status 2)."""
    from sslplug.downstream import record

    sys.stdout.flush()  # the table comes before the error, also when both go to one file
    try:
        record(run.run_dir, [{**row, "epoch": run.epoch} for row in rows])
    except OutputError as exc:
        raise OutputError(f"saving the results above failed: {exc}") from None


def _cmd_export(args: argparse.Namespace, registry: PluginRegistry) -> int:
    import torch

    from sslplug.outputs import TEMPORARY_EXTRA, check_name_lengths
    from sslplug.pretrained import build_encoder, export_backbone, load_run

    if args.out.endswith(("/", os.sep)) and not Path(args.out).is_dir():
        raise OutputError(
            f"{args.out!r} ends in {args.out[-1]!r}, so it names a folder; give the name of a "
            f"file to write, such as {str(Path(args.out) / 'backbone.pt')!r}"
        )
    out = Path(args.out)
    # OUT.pt and its note OUT.json are written under temporary names, 14 bytes longer
    longer = TEMPORARY_EXTRA + max(0, len(".json") - len(os.fsencode(out.suffix)))
    check_name_lengths(
        out, "OUT.pt", longer,
        f" (OUT.pt and its note OUT.json are written first under temporary names up to "
        f"{longer} bytes longer)",
    )
    run = load_run(args.source, registry)
    image_size = run.state.get("image_size") or 32
    encoder = build_encoder(run, registry, image_size, 0, torch.device("cpu"))
    note = export_backbone(run, encoder, out, image_size, force=args.force)
    print(f"backbone written to {out}; settings and how to load it in {note}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from sslplug.config import DataSettings, check_seed
    from sslplug.data import prepare
    from sslplug.store import check_prepare_out

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
    classes = len(marker["classes"])
    labels = f"labelled ({classes} classes)" if classes else "unlabelled"
    print(
        f"prepared {args.data} for {marker['image_size']} px crops (shorter sides up to "
        f"{marker['short_side']} px, {marker['encoding']}) in {args.out} in "
        f"{time.perf_counter() - start:.0f} s:"
    )
    for name, split in marker["splits"].items():
        count = split["images"]
        print(
            f"  {name}: {count} image{'' if count == 1 else 's'}, {labels}, "
            f"{split['bytes'] / 2**20:.1f} MiB"
        )
    print(f"  {marker['skipped']} unreadable file(s) skipped")
    return 0


def _cmd_bench(args: argparse.Namespace, registry: PluginRegistry) -> int:
    import json

    from sslplug.bench import format_bench, run_bench

    for name in ("batch_size", "image_size", "steps", "repeats"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    for name in ("warmup", "workers"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} {getattr(args, name)} must be 0 or more")
    settings = BenchSettings(
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
    results = run_bench(settings, registry)
    print(format_bench(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _torch_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """How many threads torch should use: one per core this process may run on.

    ``None`` leaves torch's own choice: when ``OMP_NUM_THREADS`` is set (the user's word, and
    torchrun's, which sets 1 for each of several processes on a machine), or when the platform
    cannot say which cores the process may use (no ``os.sched_getaffinity``). Threads beyond
    those cores take turns on them and slow each other down many times over: two runs sharing
    two cores ran ten times slower than one.
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # plugin authors must see what the contract deprecates, which Python hides by default
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"sslplug(\.|$)")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import torch  # after parsing: --help and --version need not wait for it

    threads = _torch_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        why = "one per core this process may run on"
    else:
        why = "OMP_NUM_THREADS is set" if os.environ.get("OMP_NUM_THREADS") else "torch's default"
    logging.getLogger(__name__).debug("torch uses %d thread(s): %s", torch.get_num_threads(), why)
    try:
        registry = _load_registry(args.strict_plugins)
        commands = {
            "list": lambda: _cmd_list(registry),
            "info": lambda: _cmd_info(args, registry),
            "new-plugin": lambda: _cmd_new_plugin(args),
            "run": lambda: _cmd_run(args, registry),
            "eval": lambda: _cmd_eval(args, registry),
            "finetune": lambda: _cmd_finetune(args, registry),
            "export": lambda: _cmd_export(args, registry),
            "bench": lambda: _cmd_bench(args, registry),
            "prepare": lambda: _cmd_prepare(args),
        }
        return commands[args.command]()
    except SslplugError as exc:
        print(f"sslplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslplug: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        # a path given to read (a run, a checkpoint, data): names to write are checked first
        name = str(exc.filename)
        shown = name if len(name) <= 60 else f"{name[:30]}...{name[-20:]}"
        print(
            f"sslplug: error: the path {shown!r} is too long for the file system (a file or "
            f"folder name may have at most 255 bytes on the usual ones), so nothing is there: "
            f"check the path",
            file=sys.stderr,
        )
        return 2
