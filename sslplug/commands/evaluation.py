"""``sslplug eval``: kNN and a linear probe on a run's frozen features, with all or a few
labels, and the label-free health measures on any data; the measuring is in
:mod:`sslplug.downstream`."""

from __future__ import annotations

import argparse
from typing import Any

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
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "add_arguments", "run"]

HELP = (
    "kNN and linear probe on frozen features, with all or a few labels; label-free "
    "health measures on any data"
)
DESCRIPTION = (
    "Weighted kNN and a linear probe (L-BFGS logistic regression, L2 penalty chosen on "
    "a held-out fifth) on the frozen features of a run's encoder, when the data has "
    "labels; and, labelled or not, the label-free measures of the health monitor "
    "(effective rank, spread, alignment, uniformity; docs/health.md) on the run's fixed "
    "sample of training images."
)
EPILOG = RECORDED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_and_data(parser)
    add_labels(parser, ["all"])


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    from sslplug.downstream import frozen_evaluation, health_evaluation
    from sslplug.monitors.health import HealthSettings
    from sslplug.monitors.knn import KNNSettings
    from sslplug.pretrained import build_views

    label_budgets = budgets(args, "all")
    with lock_run_folder(args.source, "eval"):  # after the cheap checks, before any work
        saved, data, device = open_run(args, registry)  # it decodes the data
        labelled = data.test is not None and data.test.labelled and data.train.labelled
        views = build_views(saved, registry, data.image_size, data.num_classes, device)
        # what the run's monitors measured with
        knn = saved.config.settings_of("knn", KNNSettings)
        health_samples = saved.config.settings_of("health", HealthSettings).samples
        rows, health = [], []
        for init, encoder in encoders(args, registry, saved, data, device):
            health.append(
                health_evaluation(
                    encoder, views, data, device, init,
                    samples=health_samples or 1024,
                    seed=saved.config.train.seed,
                )
            )
            if labelled:
                rows += frozen_evaluation(
                    encoder,
                    data,
                    label_budgets,
                    device,
                    init,
                    seed=args.label_seed,
                    knn_k=knn.k,
                    knn_temperature=knn.temperature,
                )
        _print_results(saved, data, rows, health)
        record(saved, rows + health)
    return 0


def _print_results(saved: Any, data: Any, rows: list, health: list) -> None:
    """The run measured, then the kNN and probe table (or why there is none), then the
    label-free measures."""
    from sslplug.downstream import format_health, format_table

    print(
        f"{saved.run_dir} ({', '.join(f'{k}={v}' for k, v in saved.components.items())}), "
        f"epoch {saved.epoch}, on {data.name}:"
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
