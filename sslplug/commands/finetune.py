"""``sslplug finetune``: fine-tune a run's encoder and a linear head on a few labels and report
the test accuracy; the training is in :mod:`sslplug.finetune`."""

from __future__ import annotations

import argparse

from sslplug.commands.saved_run import (
    RECORDED,
    add_labels,
    add_source_and_data,
    budgets,
    encoders,
    lock_run_folder,
    open_run,
    record,
)
from sslplug.errors import ConfigError
from sslplug.finetune import FinetuneSettings
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "add_arguments", "run"]

HELP = "fine-tune the encoder and a linear head on a few labels; report test accuracy"
DESCRIPTION = (
    "Fine-tune the whole encoder plus a linear classifier on a class-balanced subset of "
    "the labels. --baseline trains the same from the run's random initialisation: "
    "supervised training from scratch on the same labels."
)
EPILOG = RECORDED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_and_data(parser)
    add_labels(parser, ["1%"])
    defaults = FinetuneSettings()
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help=f"default {defaults.steps}"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}"
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"AdamW for the head, default {defaults.lr}"
    )
    parser.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=defaults.backbone_lr_scale,
        help=f"the encoder's learning rate relative to the head's (default "
        f"{defaults.backbone_lr_scale})",
    )
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=defaults.layer_decay,
        help="layer-wise learning-rate decay: each backbone layer learns at this times the rate "
        f"of the layer above (MAE fine-tunes ViT-B with 0.65; default {defaults.layer_decay}: off)",
    )
    parser.add_argument(
        "--no-probe-first",
        action="store_true",
        help="start from a zero head instead of the linear probe of the frozen features",
    )


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug.downstream import finetune_evaluation, format_table

    _check(args)
    label_budgets = budgets(args, "1%")
    with lock_run_folder(args.source, "finetune"):  # after the cheap checks, before any work
        saved, data, device = open_run(args, registry)  # it decodes the data
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
        for init, encoder in encoders(args, registry, saved, data, device):
            rows += finetune_evaluation(encoder, data, label_budgets, device, init, settings)
        print(f"{saved.run_dir} fine-tuned for {settings.steps} steps on {data.name}:")
        print(format_table(rows))
        record(saved, rows)
    return 0


def _check(args: argparse.Namespace) -> None:
    """Refuse training settings out of range, before the run or its data is read."""
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
