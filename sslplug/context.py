"""What every hook receives as ``run``: the facts of a run (``RunContext``) and where its
training stands (``Progress``).

The settings are ``sslplug.config``'s; this module holds what the run builds from them, so that
it may name the built parts (``sslplug.plugins.Components``, ``sslplug.data.DataSet``) without
the settings importing what builds them: those names are imported for type checking only.
``sslplug.config`` re-exports both classes, where they were first.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import attrs

if typing.TYPE_CHECKING:
    import torch
    from torch import nn

    from sslplug.config import RunConfig
    from sslplug.data import DataSet
    from sslplug.plugins import Components

__all__ = ["Progress", "RunContext"]


@attrs.define
class Progress:
    """Where training stands; the core updates it before every step.

    Attributes:
        step: optimizer steps finished so far (the 0-based index of the step about to run).
        epoch: epochs finished so far (the 0-based index of the epoch in progress).
        steps_per_epoch, total_steps: of the whole run.
    """

    step: int = 0
    epoch: int = 0
    steps_per_epoch: int = 1
    total_steps: int = 1

    @property
    def epoch_float(self) -> float:
        """Epochs done, with the fraction of the current one (1.5: half-way through epoch 2)."""
        return self.step / max(1, self.steps_per_epoch)

    @property
    def fraction(self) -> float:
        """Share of the run done, from 0 at the first step towards 1."""
        return min(1.0, self.step / max(1, self.total_steps))


@attrs.define
class RunContext:
    """Facts of a run that components may need; passed to every hook as ``run``.

    Attributes:
        config: all settings of the run.
        image_size: side of the square images the loader yields.
        channels: image channels (3).
        num_classes: label classes of the data set (0 when unlabelled).
        device: where training runs.
        steps_per_epoch, total_steps: optimizer steps.
        out_dir: the run folder.
        components: the plugin that supplied each component (``"none"`` for no target update).
        progress: the current step and epoch, updated by the core before every step; a
            component may keep ``run`` and read it for schedules and warm-ups.
        parts: the built components (``sslplug.plugins.Components``), once they are built.
        data: the run's data set (``sslplug.data.DataSet``), when training.
        baseline: what ``sslplug_evaluate`` measured on the random initialisation.
        history: the metrics of every finished epoch, oldest first (restored on resume, so a
            monitor can pick up where it was: the health monitor's collapse rule reads the
            epoch before).
        backbone: the run's backbone, once built (before the components): a view generator
            that draws masks over patches reads its grid (``sslplug.token_backbone``).
        stop_reason: set by ``request_stop``: the run ends after the current epoch, saying why.
        stop_saves: whether that epoch's checkpoint is still written.
    """

    config: RunConfig
    image_size: int
    channels: int = 3
    num_classes: int = 0
    device: torch.device | str = "cpu"
    steps_per_epoch: int = 0
    total_steps: int = 0
    out_dir: Path = Path(".")
    components: dict[str, str] = attrs.Factory(dict)
    progress: Progress = attrs.Factory(Progress)
    parts: Components | None = None
    data: DataSet | None = None
    baseline: dict[str, float] = attrs.Factory(dict)
    history: list[dict[str, float]] = attrs.Factory(list)
    backbone: nn.Module | None = None
    stop_reason: str = ""
    stop_saves: bool = True

    def request_stop(self, reason: str, save: bool = True) -> None:
        """Ask the loop to end the run after the current epoch, for ``reason`` (shown, and kept
        in ``summary.json``). A lifecycle plugin calls it, typically from
        ``sslplug_evaluate``; with ``save=False`` that epoch's checkpoint is not written, so
        the run folder keeps the previous one (the health monitor does so on collapse)."""
        self.stop_reason = reason
        self.stop_saves = self.stop_saves and save

    def __attrs_post_init__(self) -> None:
        self.progress.steps_per_epoch = max(1, self.steps_per_epoch)
        self.progress.total_steps = max(1, self.total_steps)

    def __deepcopy__(self, memo: dict[int, Any]) -> RunContext:
        """The run is shared, not copied: a component that keeps ``run`` and is deep-copied
        (a target network made from the encoder, fine-tuning's copy) reads the same live
        ``progress`` and does not copy the data set."""
        return self
