"""A saved run, as ``eval`` and ``finetune`` measure it: their shared arguments, the run's
folder locked while they work in it, the run opened with the data to measure it on, the
encoders to measure, and the results recorded in the run folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sslplug.config import load_config
from sslplug.errors import ConfigError, OutputError
from sslplug.plugins import PluginRegistry

if TYPE_CHECKING:
    from sslplug.pretrained import Run
    from sslplug.rundir import RunFolder

__all__ = [
    "RECORDED",
    "add_labels",
    "add_source_and_data",
    "budgets",
    "encoders",
    "lock_run_folder",
    "open_run",
    "record",
]

# what eval and finetune do with their results, and when saving them fails
RECORDED = (
    "The results are printed, then appended to the run's summary.json (under 'evaluations', "
    "where they stay when the run is resumed) and its TensorBoard log. When the run folder "
    "cannot be written, the printed table is all there is of them: sslplug says what could not "
    "be saved and exits with status 2. The command holds the run folder's lock while it works: "
    "on a folder where a run is training it stops at once, naming that run."
)


def add_source_and_data(parser: argparse.ArgumentParser) -> None:
    """The run to measure, and the data to measure it on."""
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


def add_labels(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """How many labels to measure with, drawn how, and whether to measure the run's random
    initialisation too; ``default`` the budgets used when none is given."""
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


def lock_run_folder(source: Path, command: str) -> RunFolder:
    """The folder of the run ``source`` names (a run folder, or a checkpoint file in one),
    locked for ``command`` while it reads the run and adds its results there (``with``
    releases it): refused at once, naming the holder, while a run works in it."""
    from sslplug.rundir import RunFolder

    folder = RunFolder(source if source.is_dir() else source.parent)
    folder.lock_to_add(command)
    return folder


def open_run(args: argparse.Namespace, registry: PluginRegistry) -> tuple[Any, Any, Any]:
    """The run ``args.source`` names, the data to measure it on (its own pre-training data
    unless ``--data`` or ``--set data.KEY=VALUE`` say otherwise), and the device."""
    from sslplug.data import SOURCES, load_data
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
    is_folder = data_settings.name not in SOURCES
    if is_folder and trained_size and not data_settings.image_size:
        data_settings = attrs.evolve(data_settings, image_size=trained_size)
    data = load_data(data_settings, seed=run.config.train.seed)
    return run, data, resolve_device(args.device)


def budgets(args: argparse.Namespace, default: str) -> list[Any]:
    """The label budgets ``--labels`` asks for (``default`` when it is not given), once
    ``--label-seed`` is known to be valid."""
    from sslplug.evaluate import parse_labels

    if not 0 <= args.label_seed < 2**32:
        raise ConfigError(
            f"--label-seed {args.label_seed} must be a whole number from 0 to {2**32 - 1}"
        )
    return [parse_labels(text) for text in (args.labels or [default])]


def encoders(
    args: argparse.Namespace, registry: PluginRegistry, run: Any, data: Any, device: Any
) -> Iterator[tuple[str, Any]]:
    """The encoders to measure, each with its name: the pre-trained one, then with
    ``--baseline`` the run's random initialisation; each is built only when its turn comes."""
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


def record(run: Run, rows: list[dict[str, Any]]) -> None:
    """Save the results just printed in the run folder, each with the epoch of the checkpoint
    measured (they stay there when the run is resumed); when that fails, say that the printed
    table is all there is of them (``main`` then exits with status 2)."""
    from sslplug.downstream import record as add_to_run_folder

    sys.stdout.flush()  # the table comes before the error, also when both go to one file
    try:
        add_to_run_folder(run.run_dir, [{**row, "epoch": run.epoch} for row in rows])
    except OutputError as exc:
        raise OutputError(f"saving the results above failed: {exc}") from None
