"""The kNN monitor: weighted kNN accuracy of the frozen features on the run's labelled data.

Runs on the random initialisation (``knn.baseline``), every ``knn.every`` epochs and after the
last one, with the train split as memory bank and the test split as queries (Wu et al. 2018;
``knn.k`` neighbours, temperature ``knn.temperature``). Returns ``knn_top1``. Its settings are
the ``[knn]`` section, which it declares as any plugin does (``eval.knn_k``,
``eval.knn_temperature``, ``eval.every`` and ``eval.baseline`` are their old names).
"""

from __future__ import annotations

import sys

import attrs
import torch
from tqdm import tqdm

from sslplug.context import RunContext
from sslplug.evaluate import knn_accuracy
from sslplug.hookspecs import hookimpl
from sslplug.validate import non_negative, positive

__all__ = ["KNNMonitor", "KNNSettings", "evaluation_due"]


@attrs.define
class KNNSettings:
    """Weighted kNN on frozen features (Wu et al. 2018): train split as memory, test as queries.

    ``k`` neighbours vote with weights ``exp(similarity / temperature)``. It runs before
    training (the randomly initialised encoder, ``baseline``), every ``every`` epochs (0: only
    at the end) and at the end.
    """

    k: int = attrs.field(default=200, validator=positive)
    temperature: float = attrs.field(default=0.1, validator=positive)
    every: int = attrs.field(default=5, validator=non_negative)
    baseline: bool = True


def evaluation_due(run: RunContext, epoch: int, every: int, baseline: bool) -> bool:
    """Whether an evaluating monitor (kNN, health) measures after ``epoch``: the random
    initialisation (epoch 0) with ``baseline``, every ``every`` epochs, and the last (the epoch
    after which the run's steps are done: ``train.epochs``, or a time limit)."""
    if epoch == 0:
        return baseline
    last = run.progress.step >= run.progress.total_steps
    return last or bool(every and epoch % every == 0)


class KNNMonitor:
    """``sslplug_evaluate``: ``{"knn_top1": percent}`` when due and the data has labels."""

    @hookimpl
    def sslplug_settings(self) -> type:
        return KNNSettings

    @hookimpl
    def sslplug_evaluate(self, run: RunContext, epoch: int) -> dict[str, float] | None:
        settings, data = run.config.settings_of("knn", KNNSettings), run.data
        if not evaluation_due(run, epoch, settings.every, settings.baseline):
            return None
        if data is None or data.test is None or run.parts is None:
            return None
        if not data.test.labelled or not data.train.labelled:
            return None
        top1 = knn_accuracy(
            run.parts.encoder,
            data.train,
            data.test,
            data.num_classes,
            torch.device(run.device),
            k=settings.k,
            temperature=settings.temperature,
        )
        if epoch == 0:
            pretrained = run.config.model.pretrained
            start = (
                "the randomly initialised encoder"
                if pretrained is False
                else f"the encoder before training (model.pretrained={pretrained})"
            )
            text = f"kNN top-1 of {start}: {top1:.2f}%"
            tqdm.write(text, file=sys.stderr)
        return {"knn_top1": top1}
