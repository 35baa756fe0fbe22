"""The progress bar (tqdm, with an ETA) and one line per finished epoch, on stderr."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from sslplug.config import RunContext
from sslplug.hookspecs import hookimpl


class ProgressBar:
    """A bar over the run's steps, moved at every logged step; ``train.progress = false``
    hides the bar and keeps the epoch lines."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.shown = 0

    @hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        self.shown = run.progress.step
        self.bar = tqdm(
            total=run.total_steps,
            initial=self.shown,
            disable=not run.config.train.progress,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    @hookimpl
    def sslplug_step_end(self, run: RunContext, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.shown)
        self.shown = step
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", epoch=run.progress.epoch + 1)

    @hookimpl
    def sslplug_epoch_end(self, run: RunContext, epoch: int, metrics: dict[str, float]) -> None:
        knn = f", kNN top-1 {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
        health = f", rank {metrics['rank_features']:.1f}" if "rank_features" in metrics else ""
        if health and "spread_features" in metrics:  # not measured on fewer than two images
            health += f", spread {metrics['spread_features']:.3f}"
        tqdm.write(
            f"epoch {epoch}/{run.config.train.epochs}: loss {metrics['loss']:.4f}, "
            f"{metrics['images_per_second']:.0f} img/s, "
            f"data wait {100 * metrics['data_wait_share']:.1f}%{knn}{health}",
            file=sys.stderr,
        )

    @hookimpl
    def sslplug_run_end(self, run: RunContext, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
