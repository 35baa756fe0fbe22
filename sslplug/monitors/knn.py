"""The kNN monitor: weighted kNN accuracy of the frozen features on the run's labelled data.

Runs on the random initialisation (``eval.baseline``), every ``eval.every`` epochs and after
the last one, with the train split as memory bank and the test split as queries (Wu et al.
2018; ``eval.knn_k`` neighbours, temperature ``eval.knn_temperature``). Returns ``knn_top1``.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from sslplug.config import RunContext
from sslplug.evaluate import knn_accuracy
from sslplug.hookspecs import hookimpl


def evaluation_due(run: RunContext, epoch: int) -> bool:
    """Whether the evaluating monitors (kNN, health) measure after ``epoch``: the random
    initialisation (epoch 0) with ``eval.baseline``, every ``eval.every`` epochs, and the last
    (the epoch after which the run's steps are done: ``train.epochs``, or a time limit)."""
    settings = run.config.eval
    if epoch == 0:
        return settings.baseline
    last = run.progress.step >= run.progress.total_steps
    return last or bool(settings.every and epoch % settings.every == 0)


class KNNMonitor:
    """``sslplug_evaluate``: ``{"knn_top1": percent}`` when due and the data has labels."""

    @hookimpl
    def sslplug_evaluate(self, run: RunContext, epoch: int) -> dict[str, float] | None:
        settings, data = run.config.eval, run.data
        if not evaluation_due(run, epoch) or data is None or data.test is None:
            return None
        if not data.test.labelled or not data.train.labelled:
            return None
        top1 = knn_accuracy(
            run.parts.encoder,
            data.train,
            data.test,
            data.num_classes,
            torch.device(run.device),
            k=settings.knn_k,
            temperature=settings.knn_temperature,
        )
        if epoch == 0:
            text = f"kNN top-1 of the randomly initialised encoder: {top1:.2f}%"
            tqdm.write(text, file=sys.stderr)
        return {"knn_top1": top1}
