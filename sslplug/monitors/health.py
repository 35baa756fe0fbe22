"""The health monitor: label-free measures of the representation, and the collapse warning.

Before training, every ``health.every`` epochs and after the last (the kNN monitor's epochs by
default), on a fixed sample of ``health.samples`` training images drawn once per run (seeded,
un-augmented), it measures the effective rank and the spread of the backbone features and of
the projections (when the encoder has a projector), and the alignment of two augmented views
(when the view generator makes two) and the uniformity of the features (``sslplug.health``).
The measures go to the epoch's metrics, so TensorBoard, the epoch line and ``summary.json``
show them.

When the measures say the embeddings collapsed (``sslplug.health.collapse``) it prints a
warning naming the measure, its value and the likely causes for the method in use (the
``collapse_hint`` of the run's loss, ``sslplug.Loss``); with
``train.stop_on_collapse`` the run stops before that epoch's checkpoint is written, so the
last checkpoint kept is the last good one, and ``sslplug run --resume`` continues it only with
``--ignore-collapse`` (which switches the stop off; the warning stays). On data without labels
it says once that no kNN accuracy can be computed, and the measures are what the run shows.
Its settings are the ``[health]`` section, which it declares as any plugin does
(``eval.health_samples``, ``eval.every`` and ``eval.baseline`` are their old names).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from tqdm import tqdm

from sslplug.augment import normalize, to_float
from sslplug.context import RunContext
from sslplug.data import Split
from sslplug.health import (
    COLLAPSE_MIN_STEPS,
    alignment,
    collapse,
    effective_rank,
    spread,
    uniformity,
)
from sslplug.hookspecs import hookimpl
from sslplug.monitors.knn import evaluation_due
from sslplug.validate import non_negative

__all__ = [
    "HealthMonitor",
    "HealthSettings",
    "collapse_warning",
    "measure_health",
    "sample_images",
]

_ALIGNMENT_IMAGES = 512
_QUICK_IMAGES = 256
_CHUNK = 256

# The causes named when the run's loss names none (``sslplug.Loss.collapse_hint``).
_GENERIC = (
    "a learning rate too high, a missing predictor or stop-gradient, or a target momentum too "
    "low (target updated too fast)"
)


@attrs.define
class HealthSettings:
    """The label-free measures (effective rank, spread, alignment, uniformity) of ``samples``
    training images (0: off), before training (``baseline``), every ``every`` epochs (0: only at
    the end) and at the end, as the kNN monitor's ``[knn]`` does by default."""

    samples: int = attrs.field(default=1024, validator=non_negative)
    every: int = attrs.field(default=5, validator=non_negative)
    baseline: bool = True


def sample_images(split: Split, count: int, seed: int) -> Tensor:
    """``count`` training images (uint8 squares) drawn once with ``seed``."""
    generator = torch.Generator().manual_seed(seed * 7_919 + 17)
    index = torch.randperm(len(split), generator=generator)[:count].sort().values
    images = split.squares(index).images
    assert images is not None
    return images


def _features(encoder: Any, images: Tensor, device: torch.device) -> Tensor:
    return torch.cat(
        [
            encoder.features(normalize(to_float(chunk.to(device)))).float()
            for chunk in images.split(_CHUNK)
        ]
    )


@torch.no_grad()
def measure_health(
    encoder: Any, views: nn.Module | None, images: Tensor, device: torch.device
) -> dict[str, float]:
    """The label-free measures of ``encoder`` on uint8 ``images`` (``sslplug.health``).

    ``views`` (the run's view generator, or ``None``) supplies two augmented views for the
    alignment when it provides ``two_views``; torch's random state is left as it was.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        features = _features(encoder, images, device)
        measured: dict[str, float | None] = {
            "rank_features": effective_rank(features),
            "spread_features": spread(features),
            "uniformity": uniformity(features[:1024]),
        }
        projector = getattr(encoder, "projector", None)
        if isinstance(projector, nn.Module):
            projections = torch.cat([projector(f).float() for f in features.split(_CHUNK)])
            measured["rank_projections"] = effective_rank(projections)
            measured["spread_projections"] = spread(projections)
        # undefined for a single image (no pair, no deviation): not measured, left out
        measures = {name: value for name, value in measured.items() if value is not None}
        if views is not None and "two_views" in getattr(views, "provides", ()):
            measures["alignment"] = _alignment(encoder, views, images[:_ALIGNMENT_IMAGES], device)
    finally:
        encoder.train(was_training)
    return measures


@torch.no_grad()
def quick_spread(encoder: Any, images: Tensor, device: torch.device) -> dict[str, float]:
    """The spread of the features and projections of ``images`` alone (no singular values,
    no views): what the collapse rule reads on the epochs between full measurements."""
    was_training = encoder.training
    encoder.eval()
    try:
        features = _features(encoder, images, device)
        measured = {"spread_features": spread(features)}
        projector = getattr(encoder, "projector", None)
        if isinstance(projector, nn.Module):
            measured["spread_projections"] = spread(projector(features).float())
    finally:
        encoder.train(was_training)
    return {name: value for name, value in measured.items() if value is not None}


def _alignment(
    encoder: Any, views: nn.Module, images: Tensor, device: torch.device
) -> float:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        made = views(images.to(device))
    first, second = made.images[0], made.images[1]
    a = torch.cat([encoder.features(chunk).float() for chunk in first.split(_CHUNK)])
    b = torch.cat([encoder.features(chunk).float() for chunk in second.split(_CHUNK)])
    return alignment(a, b)


def collapse_warning(
    measure: str, value: float, epoch: int, causes: str = "", stops: bool = False
) -> str:
    """The text of the collapse warning, with the ``causes`` likely for the method in use (its
    loss's ``collapse_hint``; ``""``: the usual ones); what it advises depends on whether the
    run ``stops`` for it (``train.stop_on_collapse``)."""
    causes = causes or _GENERIC
    advice = (
        "train.stop_on_collapse is set: the run stops now (docs/health.md)"
        if stops
        else "Set train.stop_on_collapse=true to stop such a run at once (docs/health.md)"
    )
    return (
        f"warning: the embeddings have collapsed after epoch {epoch}: {measure} is {value:.4f} "
        f"(below 0.05 after this epoch and the one before, and not recovering: nearly every "
        f"image gets the same direction). Likely causes: {causes}. {advice}"
    )


def _spreads(metrics: dict[str, float]) -> dict[str, float]:
    """What the collapse rule reads of an epoch's metrics: the spreads."""
    return {k: metrics[k] for k in ("spread_features", "spread_projections") if k in metrics}


class HealthMonitor:
    """``sslplug_evaluate``: the label-free measures, when due; warns on collapse. The rule
    reads the epoch before, which a resumed run finds in ``run.history`` (saved with every
    checkpoint), so that resuming changes none of its findings."""

    def __init__(self) -> None:
        self._images: Tensor | None = None
        self._for: Any = None
        self._previous: dict[str, float] = {}  # the last epoch's measures (collapse rule)

    @hookimpl
    def sslplug_settings(self) -> type:
        return HealthSettings

    @hookimpl
    def sslplug_evaluate(self, run: RunContext, epoch: int) -> dict[str, float] | None:
        settings, data = run.config.settings_of("health", HealthSettings), run.data
        due = evaluation_due(run, epoch, settings.every, settings.baseline)
        if data is None or run.parts is None or not settings.samples:
            return None
        if not due and epoch == 0:
            return None
        if self._for is not run:
            self._images = sample_images(data.train, settings.samples, run.config.train.seed)
            # a resumed run goes on from the epoch before, as if never interrupted
            self._for, self._previous = run, _spreads(run.history[-1] if run.history else {})
            if not data.train.labelled:
                tqdm.write(
                    f"{data.name} has no labels: no kNN accuracy can be computed; the run shows "
                    f"the label-free measures instead (effective rank, spread, alignment, "
                    f"uniformity: docs/health.md)",
                    file=sys.stderr,
                )
        assert self._images is not None
        start = time.perf_counter()
        device = torch.device(run.device)
        if due:
            measures = measure_health(run.parts.encoder, run.parts.views, self._images, device)
        else:  # between evaluations: the spread of a few images, for the collapse rule
            measures = quick_spread(run.parts.encoder, self._images[:_QUICK_IMAGES], device)
        measures["health_seconds"] = time.perf_counter() - start
        if epoch == 0:
            return measures
        # the first steps reshape a random projector: its outputs may point alike for a while
        judged = run.progress.step >= COLLAPSE_MIN_STEPS
        found = collapse(measures, self._previous) if judged else None
        self._previous = measures
        if found is not None:
            measures["collapsed"] = 1.0
            causes = getattr(run.parts.loss, "collapse_hint", "")
            stops = run.config.train.stop_on_collapse
            tqdm.write(collapse_warning(*found, epoch, causes, stops), file=sys.stderr)
            if stops:
                run.request_stop(
                    f"the embeddings collapsed ({found[0]} {found[1]:.4f}) and "
                    f"train.stop_on_collapse is set, so this epoch was not saved; to continue "
                    f"anyway: sslplug run --resume {run.out_dir} --ignore-collapse",
                    save=False,
                )
        return measures
