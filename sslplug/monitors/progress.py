"""The progress bar (tqdm, with an ETA), on stderr: ``--disable progress`` switches it off.

The line after every epoch is the run's report, which the core prints
(``sslplug.report.epoch_line``), so it stays when the bar is switched off.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from sslplug.context import RunContext
from sslplug.hookspecs import hookimpl


class ProgressBar:
    """A bar over the run's steps, moved at every logged step."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.shown = 0

    @hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        self.shown = run.progress.step
        self.bar = tqdm(
            total=run.total_steps,
            initial=self.shown,
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
    def sslplug_run_end(self, run: RunContext, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
