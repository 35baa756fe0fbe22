"""What a run tells: its lines on the terminal and the summary it ends with.

Lines go to standard error on rank 0 alone, above the progress bar (``say``): among them one
after every epoch (``epoch_line``), which stays when the bar is switched off. The summary is
what ``train`` returns and writes to ``summary.json``: the run's final metrics, its history
of kNN accuracy and health measures, how and why it ended, and the evaluations ``eval`` and
``finetune`` recorded in it before a resume.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from sslplug import distributed
from sslplug.data import DataSet
from sslplug.health import HEALTH_MEASURES, collapse
from sslplug.run_state import RunState
from sslplug.runtime import resolve_precision

__all__ = [
    "data_line",
    "epoch_line",
    "say",
    "say_epoch",
    "say_stopped",
    "say_time_limit",
    "summary",
]


def say(text: str) -> None:
    """Print ``text`` on rank 0, to standard error, without breaking the progress bar."""
    if distributed.is_main():
        tqdm.write(text, file=sys.stderr)


def data_line(data: DataSet) -> str:
    """One line saying what a run trains on: the data set's name, its train and test images,
    its classes (or that it is unlabelled) and the unreadable files skipped so far."""

    def images(count: int, split: str) -> str:
        return f"{count} {split} image{'' if count == 1 else 's'}"

    test = images(len(data.test), "test") if data.test is not None else "no test split"
    if not data.train.labelled:
        labels = "unlabelled"
    else:
        labels = f"{data.num_classes} classes" if data.num_classes else "labelled"
    skipped = f", {data.skipped} unreadable file(s) skipped" if data.skipped else ""
    return f"data {data.name}: {images(len(data.train), 'train')}, {test}, {labels}{skipped}"


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """The line after epoch ``epoch`` of ``epochs``: its mean loss, speed and share of time
    waiting for data, and what the monitors measured (kNN top-1; the features' effective rank
    and spread)."""
    knn = f", kNN top-1 {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
    health = f", rank {metrics['rank_features']:.1f}" if "rank_features" in metrics else ""
    if health and "spread_features" in metrics:  # not measured on fewer than two images
        health += f", spread {metrics['spread_features']:.3f}"
    return (
        f"epoch {epoch}/{epochs}: loss {metrics['loss']:.4f}, "
        f"{metrics['images_per_second']:.0f} img/s, "
        f"data wait {100 * metrics['data_wait_share']:.1f}%{knn}{health}"
    )


def say_epoch(run: RunState, metrics: dict[str, float]) -> None:
    """Print the line of the epoch just finished (``epoch_line``)."""
    say(epoch_line(run.epoch, run.config.train.epochs, metrics))


def say_stopped(run: RunState) -> None:
    """A lifecycle plugin stopped the run (``RunContext.request_stop``): why, and what is kept."""
    kept = (
        f"the checkpoint of epoch {run.saved[0]} is kept in {str(run.checkpoint)!r}"
        if run.saved is not None
        else "no checkpoint was written"
    )
    say(f"stopped after epoch {run.epoch}: {run.context.stop_reason}; {kept}")


def say_time_limit(run: RunState, began: float) -> None:
    """``train.max_minutes`` ended this session: where, and how to continue."""
    minutes = (time.perf_counter() - began) / 60
    say(
        f"train.max_minutes={run.config.train.max_minutes:g}: stopped after epoch {run.epoch} "
        f"of {run.config.train.epochs}, {minutes:.2f} minutes into this session; the "
        f"checkpoint of epoch {run.epoch} is in {str(run.checkpoint)!r}. Continue with: "
        f"sslplug run --resume {run.out_dir}"
    )


def summary(run: RunState) -> dict[str, Any]:
    """The run's summary, as ``summary.json`` holds it."""
    knn_points = [h for h in run.history if "knn_top1" in h]
    train = run.config.train
    elapsed = ("train_seconds", "wall_seconds")  # absent from runs begun before they were kept
    return {
        "run_dir": str(run.out_dir),
        "data": run.data.name,
        "backbone": run.config.model.backbone,
        # where the weights started: false (random), true (published) or a path
        "pretrained": run.config.model.pretrained,
        "components": dict(run.context.components),
        "epochs": run.epoch,
        "steps": run.step,
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "knn_top1": knn_points[-1]["knn_top1"] if knn_points else None,
        "knn_top1_random_init": run.context.baseline.get("knn_top1"),
        "knn_history": [
            {"epoch": h["epoch"], "top1": h["knn_top1"], **{k: h[k] for k in elapsed if k in h}}
            for h in knn_points
        ],
        "health_history": [
            {"epoch": h["epoch"], **{k: h[k] for k in HEALTH_MEASURES if k in h}}
            for h in [{"epoch": 0, **run.context.baseline}, *run.history]
            if "rank_features" in h
        ],
        "baseline": dict(run.context.baseline),
        "images_per_second_median": _median(run.history, "images_per_second"),
        "data_wait_share_median": _median(run.history, "data_wait_share"),
        "wall_seconds_this_session": time.perf_counter() - run.started,
        "train_seconds": run.history[-1].get("train_seconds") if run.history else None,
        "epochs_planned": train.epochs,
        "stopped_by_time_limit": run.out_of_time,
        "stopped": run.context.stop_reason or None,
        "precision": resolve_precision(train.precision, torch.device(run.context.device)).name,
        "compile": train.compile,
        "skipped_images": run.data.skipped + run.loader.skipped,
        "stopped_for_collapse": _collapse_stop(run),
        "collapsed_epochs": [h["epoch"] for h in run.history if h.get("collapsed")],
        "evaluations": run.evaluations,
    }


def _collapse_stop(run: RunState) -> dict[str, Any] | None:
    """What ``summary.json`` keeps of a stop for collapse (``train.stop_on_collapse``): the
    epoch, the measure and its value, and the checkpoint kept (its epoch and step), from
    which a resume continues only with ``--ignore-collapse``. ``None`` for any other end."""
    last = run.history[-1] if run.history else {}
    if not (run.context.stop_reason and not run.context.stop_saves and last.get("collapsed")):
        return None
    found = collapse(last, run.history[-2] if len(run.history) > 1 else None)
    # the monitor's rule read the same two epochs, so ``found`` is what it warned of
    measure, value = found if found is not None else ("spread", None)
    kept_epoch, kept_step = run.saved if run.saved is not None else (None, None)
    return {
        "epoch": last["epoch"],
        "measure": measure,
        "value": value,
        "checkpoint_epoch": kept_epoch,
        "checkpoint_step": kept_step,
    }


def _median(history: list[dict[str, float]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return statistics.median(values) if values else None
