"""What the training loop holds for one run, and what of it a checkpoint keeps.

The run's facts that components see live in its ``RunContext`` (``sslplug.config``): the
settings, the run folder, the history of finished epochs and, in ``RunContext.progress``, the
step and the epoch. ``RunState`` holds no copy of them: its ``config``, ``out_dir``,
``history``, ``step`` and ``epoch`` read and write the context's, so the counters are kept in
one place, which components read and the core alone writes (``sslplug.engine`` as it trains,
``sslplug.resume`` when it restores a checkpoint). ``RunState`` adds what only the loop needs:
the data and its loader, the lifecycle hooks, the clocks, and where the run stands with its
checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from sslplug import distributed
from sslplug.assembly import Assembly
from sslplug.checkpoint import FILENAME
from sslplug.config import Progress, RunConfig, RunContext
from sslplug.data import DataSet, Loader
from sslplug.fsdp import full_state
from sslplug.optim import Optimization
from sslplug.outputs import write_atomically
from sslplug.plugins import Components, Lifecycle
from sslplug.runtime import rng_state

__all__ = ["RunState", "saved_settings", "write_settings"]


@attrs.define
class RunState:
    """What the loop holds; kept together so that checkpointing sees all of it."""

    assembly: Assembly
    lifecycle: Lifecycle
    data: DataSet
    loader: Loader
    epoch_loss_sum: float = 0.0  # of the steps of an unfinished epoch, for a mid-epoch resume
    started: float = attrs.Factory(time.perf_counter)
    saved: tuple[int, int] | None = None  # (epoch, step) of the checkpoint in the run folder
    clock: float = attrs.Factory(time.perf_counter)  # when the last epoch ended (or the loop began)
    out_of_time: bool = False  # train.max_minutes stopped the run
    # what `sslplug eval` and `finetune` recorded in summary.json before a resume: kept in it
    evaluations: list[dict[str, Any]] = attrs.Factory(list)
    stop_requested: bool = False  # a lifecycle plugin asked to stop (RunContext.request_stop)

    @property
    def context(self) -> RunContext:
        return self.assembly.context

    @property
    def config(self) -> RunConfig:
        return self.context.config

    @property
    def out_dir(self) -> Path:
        return self.context.out_dir

    @property
    def progress(self) -> Progress:
        return self.context.progress

    @property
    def step(self) -> int:
        """Optimizer steps finished so far (``RunContext.progress.step``)."""
        return self.context.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.context.progress.step = value

    @property
    def epoch(self) -> int:
        """Epochs finished so far, the 0-based index of the one in progress
        (``RunContext.progress.epoch``)."""
        return self.context.progress.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.context.progress.epoch = value

    @property
    def history(self) -> list[dict[str, float]]:
        """The metrics of every finished epoch (``RunContext.history``)."""
        return self.context.history

    @history.setter
    def history(self, value: list[dict[str, float]]) -> None:
        self.context.history = value

    @property
    def parts(self) -> Components:
        return self.assembly.parts

    @property
    def optimization(self) -> Optimization:
        assert self.assembly.optimization is not None
        return self.assembly.optimization

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / FILENAME

    def checkpoint_state(self) -> dict[str, Any]:
        """What ``last.pt`` holds (``docs/hooks.md`` lists the keys). Called on every rank: it
        gathers each rank's random-number state and, under ``train.strategy = "fsdp"``, the
        whole tensors of the shards (``sslplug.fsdp.full_state``), which rank 0 alone keeps."""
        modules = {
            name: (full_state(m.state_dict()) if m is not None else None)
            for name, m in self.parts.modules().items()
        }
        baseline = self.context.baseline
        return {
            **modules,
            **full_state(self.optimization.state_dict()),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng_state(),
            "rng_per_rank": distributed.gather_objects(rng_state()),
            "settings": saved_settings(self.config, self.lifecycle),
            "components": dict(self.context.components),
            "history": self.history,
            "baseline": dict(baseline),
            "knn_baseline": baseline.get("knn_top1"),
            "feature_dim": self.parts.encoder.feature_dim,
            "image_size": self.context.image_size,
            "init_rng": self.assembly.init_rng,
            "epoch_loss_sum": self.epoch_loss_sum,
            "steps_per_epoch": len(self.loader),
            "batch_size": self.config.train.batch_size,
        }


def saved_settings(config: RunConfig, lifecycle: Lifecycle) -> dict[str, Any]:
    """The settings a run saves: the core sections and those of the plugins it uses, for its
    components or through the lifecycle hooks."""
    return config.to_dict(config.used_plugin_sections(lifecycle.plugins))


def write_settings(run: RunState) -> None:
    """Write the run's ``settings.toml``: its saved settings with the plugin of each component,
    under a comment naming the code behind each (module and distribution), which is not read
    back: the names choose the plugins when the run resumes."""
    settings = saved_settings(run.config, run.lifecycle)
    settings["components"].update(run.context.components)
    code = "".join(f"#   {part} = {origin}\n" for part, origin in run.parts.code.items())
    header = f"# the code behind each component when this run was started:\n{code}\n"
    write_atomically({run.out_dir / "settings.toml": (header + tomli_w.dumps(settings)).encode()})
