"""Resuming a run: which folder and checkpoint it continues from, what is checked first, and
what is restored.

``sslplug run --resume RUN_DIR`` (``train(..., resume=RUN_DIR)``) continues the run in its own
folder from its ``last.pt``, written after every epoch and when a stop is asked for. What
resuming guarantees:

- **Bit-exact continuation.** On the same device and number of ranks, a resumed run computes
  the same losses and ends with the same weights as a run that was never stopped, whether it
  stopped at the end of an epoch or inside one: the loader skips the batches of the epoch
  already seen (their order depends only on the seed and the epoch) and everything the steps
  to come depend on is restored.
- **What is restored**: the state of every component (view generator, encoder, loss, target
  update: queues and centres included), the optimizer and the learning-rate schedule, the step
  and epoch (into ``RunContext.progress``, which components read), the random-number states
  (each rank's own; with another number of ranks, rank 0's and a fresh stream per rank), the
  loss summed over the steps of an unfinished epoch, the history of finished epochs, the
  baseline measured on the random initialisation and the random state the components were
  built from (``init_rng``).
- **More epochs than planned** (``--epochs``) never stretch the schedules over the new total:
  the added epochs are a new cycle of them (``train.extend = "restart"``) or hold their end
  values (``"continue"``); ``extended_cycles`` records which in ``train.cycles``, saved with
  the run, so a resumed run resumed again follows the same schedules, bit for bit.
- **What is carried over** in the run folder: the evaluations ``eval`` and ``finetune``
  recorded in ``summary.json``, written again in the summary at the end.
- **What is refused**, before any work: a checkpoint of other components or of another model;
  settings that change the steps of an epoch (batch size, ``train.max_steps_per_epoch``, the
  data), on which the step count, the schedules and the place inside an epoch rest; a
  ``summary.json`` that is not sslplug's; and, unless ``--ignore-collapse``, continuing a run
  that ``train.stop_on_collapse`` stopped from the checkpoint that stop kept.

A folder holding the settings of a run stopped before its first checkpoint starts over from
epoch 0 with them. Checkpoints of an older format are read through ``sslplug.checkpoint``'s
``migrate``; nothing here knows an older layout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from sslplug import distributed
from sslplug.checkpoint import FILENAME, load_checkpoint, write_failure
from sslplug.config import RunConfig
from sslplug.errors import CheckpointError, ConfigError
from sslplug.fsdp import load_full_state, shard_optimizer_state
from sslplug.health import COLLAPSE_SPREAD
from sslplug.outputs import read_summary
from sslplug.report import say
from sslplug.run_state import RunState
from sslplug.rundir import RUN_FILES, RunFolder, RunFolderError
from sslplug.runtime import set_rng_state

__all__ = [
    "extended_cycles",
    "make_folder_ready",
    "restore",
    "resume_point",
    "resumes_in",
    "run_folder",
]

log = logging.getLogger(__name__)


def run_folder(config: RunConfig, resume: str | Path | None) -> Path:
    """A resumed run continues in its own folder; a new one goes to ``train.out``."""
    if resume is not None and Path(resume).is_dir():
        return Path(resume)
    return Path(config.train.out or _default_out(config))


def _default_out(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.components.plugin}-{stamp}"


def resumes_in(folder: RunFolder, resume: str | Path | None) -> bool:
    """Whether ``resume`` (a run folder, or a checkpoint file in one) continues the run in
    ``folder``, rather than starting a new one there."""
    if resume is None:
        return False
    resumed_from = Path(resume)
    if not resumed_from.is_dir():
        resumed_from = resumed_from.parent  # a checkpoint file: its run's folder
    return resumed_from.resolve() == folder.path.resolve()


def resume_point(
    folder: RunFolder, resume: str | Path | None, ignore_collapse: bool
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The checkpoint ``resume`` continues from (``None`` for a new run, or one that starts
    over) and the evaluations the run's ``summary.json`` carries over; refuses to continue a
    run stopped for collapse unless ``ignore_collapse``."""
    checkpoint = _checkpoint_to_resume(resume)
    resumed: dict[str, Any] = {}
    if checkpoint is not None and resumes_in(folder, resume):
        resumed = _resumed_summary(folder.path)
        _check_collapse_stop(resumed, checkpoint, folder.path, ignore_collapse)
    return checkpoint, list(resumed.get("evaluations", []))


def _checkpoint_to_resume(resume: str | Path | None) -> dict[str, Any] | None:
    """The checkpoint ``resume`` names; ``None`` for a new run, and for a run folder that holds
    the settings of a run stopped before its first checkpoint, which then starts over."""
    if resume is None:
        return None
    folder = Path(resume)
    started = folder.is_dir() and (folder / "settings.toml").is_file()
    if started and not (folder / FILENAME).exists():
        return None
    return load_checkpoint(resume)


def _resumed_summary(folder: Path) -> dict[str, Any]:
    """The ``summary.json`` of the run resumed in ``folder`` (``{}`` when there is none): the
    rows ``eval`` and ``finetune`` recorded there are written again at the end, and it says
    whether the run stopped for collapse. One that is not sslplug's is refused before any
    work, rather than replaced at the end."""
    try:
        return read_summary(folder)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8, or not ours
        raise RunFolderError(
            f"cannot resume the run in {str(folder)!r}: its summary.json cannot be read: "
            f"{write_failure(exc)}; move that file aside (the run writes a new one at its end), "
            f"then resume again"
        ) from None


def _check_collapse_stop(
    summary: dict[str, Any], checkpoint: dict[str, Any], folder: Path, ignore: bool
) -> None:
    """Refuse to continue a run that ``train.stop_on_collapse`` stopped from the checkpoint that
    stop kept, unless ``ignore`` (``--ignore-collapse``): it would train into the same collapse.
    A run resumed since from a later checkpoint is not asked again."""
    stop = summary.get("stopped_for_collapse")
    if not isinstance(stop, dict):
        return
    kept = [stop.get("checkpoint_epoch"), stop.get("checkpoint_step")]
    if kept != [checkpoint.get("epoch"), checkpoint.get("step")]:
        return
    epoch, measure, value = stop.get("epoch"), stop.get("measure"), stop.get("value")
    what = f"{measure} {value:.4f}" if isinstance(value, int | float) else str(measure)
    if ignore:
        say(
            f"--ignore-collapse: {folder} stopped after epoch {epoch} because its embeddings "
            f"collapsed ({what}); it continues from its checkpoint of epoch {kept[0]} and no "
            f"longer stops for collapse (train.stop_on_collapse=false); the health monitor "
            f"still warns"
        )
        return
    raise ConfigError(
        f"--resume {str(folder)!r}: the run stopped after epoch {epoch} because its embeddings "
        f"collapsed ({what}, below {COLLAPSE_SPREAD} two epochs in a row), and resuming from its "
        f"checkpoint of epoch {kept[0]} would train into the same collapse. Start a new run "
        f"with a lower learning rate (--set optim.lr=...) or another recipe (docs/health.md "
        f"lists the likely causes), or add --ignore-collapse to continue this one anyway"
    )


def make_folder_ready(
    folder: RunFolder,
    resume: str | Path | None,
    checkpoint: dict[str, Any] | None,
    overwrite: bool,
) -> None:
    """Clear the way for the run, saying what was removed: another run's files (only when
    ``overwrite``), the outputs of a start that never reached a checkpoint, temporary files of
    a checkpoint write cut short."""
    if not resumes_in(folder, resume):
        removed = folder.start_new_run(overwrite)
        if removed:
            say(f"--overwrite: removed the earlier run's {', '.join(removed)} in {folder.path}")
    elif checkpoint is None:
        removed = folder.remove(tuple(name for name in RUN_FILES if name != "settings.toml"))
        say(
            f"{folder.path} holds a run stopped before its first checkpoint (no {FILENAME}): "
            f"starting it over from epoch 0 with its saved settings"
            + (f" (removed its {', '.join(removed)})" if removed else "")
        )
    stale = folder.remove_stale_temporaries()
    if stale:
        say(
            f"removed {len(stale)} temporary file(s) of a checkpoint write that was cut short: "
            + ", ".join(str(path) for path in stale)
        )


def restore(run: RunState, state: dict[str, Any], source: Path) -> None:
    """Continue ``run`` from the checkpoint ``state`` read from ``source``: check that it is
    this run's, restore what the module docstring lists, and say when ``train.epochs`` changed
    since the run was set up."""
    if state.get("components") != run.context.components:
        raise CheckpointError(
            f"{str(source)!r} was written by components {state.get('components')}, not "
            f"{run.context.components}"
        )
    _check_same_epochs(run, state, source)
    _restore_modules(run, state, source)
    run.optimization.load_state_dict(state)
    shard_optimizer_state(run.optimization.optimizer)  # train.strategy=fsdp: whole -> shards
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    run.saved = (run.epoch, run.step)
    run.history = list(state["history"])
    run.context.baseline = dict(state["baseline"])
    if state["init_rng"] is not None:  # None: built from the run's seed (sslplug.checkpoint)
        run.assembly.init_rng = state["init_rng"]
    run.epoch_loss_sum = float(state["epoch_loss_sum"])
    per_rank = state["rng_per_rank"]
    if len(per_rank) == distributed.world_size():
        set_rng_state(per_rank[distributed.rank()])
    else:  # saved with another number of ranks: a fresh stream per rank and step
        set_rng_state(state["rng"])
        if distributed.is_distributed():
            torch.manual_seed(run.config.train.seed * 7919 + distributed.rank() + run.step)
    log.info("resumed from %s at epoch %d, step %d", source, run.epoch, run.step)
    planned = state.get("settings", {}).get("train", {}).get("epochs")
    epochs = run.config.train.epochs
    if planned is not None and planned != epochs and epochs > run.epoch:
        say(_schedules_note(planned, epochs, run.config))


def _schedules_note(planned: int, epochs: int, config: RunConfig) -> str:
    """What a resume to ``epochs`` instead of the ``planned`` ones does to the schedules of a
    run with ``config``: which mode, and the learning rate the added epochs start at."""
    added = f"epoch {epochs}" if epochs == planned + 1 else f"epochs {planned + 1}-{epochs}"
    if epochs < planned:
        what = "the schedules now end at the new end"
    elif config.train.extend == "restart":
        start = (
            f"warms up again over {config.optim.warmup_epochs:g} epoch(s)"
            if config.optim.warmup_epochs > 0
            else "starts again at optim.lr"
        )
        what = (
            f"{added} {'is' if epochs == planned + 1 else 'are'} a new cycle of the schedules "
            f"(the learning rate {start} and decays to the new end; --extend continue "
            f"holds their end values instead)"
        )
    else:
        floor = config.optim.lr_floor * config.optim.lr
        held = (
            "a learning rate of 0, so the scheduled weights no longer change; set "
            "optim.lr_floor above 0 to go on learning slowly"
            if floor == 0
            else f"a learning rate of {floor:g} (optim.lr_floor times optim.lr)"
        )
        what = (
            f"the schedules end at epoch {planned} as planned and hold their end values for "
            f"{added}: {held} (--extend restart starts a new cycle instead)"
        )
    return f"train.epochs is now {epochs} (the run was set for {planned}): {what}"


def extended_cycles(config: RunConfig, checkpoint: dict[str, Any] | None) -> RunConfig:
    """``config`` with ``train.cycles`` for a resumed run whose ``train.epochs`` differ from
    the checkpoint's plan; unchanged for a new run and for one resumed to its plan.

    More epochs than planned: ``train.extend = "restart"`` adds a cycle over the added epochs
    (the learning rate warms up again and decays to its floor at the new end, a warm restart as
    in SGDR, Loshchilov & Hutter 2017); ``"continue"`` adds none, so the schedules end where
    they were planned to and hold their end values. Fewer: the cycles end at the new end. The
    result is saved with the run, so resuming it again keeps the same schedules.
    """
    saved = (checkpoint or {}).get("settings", {}).get("train", {})
    planned, epochs = saved.get("epochs"), config.train.epochs
    if checkpoint is None or planned is None:
        return config
    cycles = [(int(start), int(end)) for start, end in saved.get("cycles", ())] or [(0, planned)]
    if epochs > planned:
        if config.train.extend == "restart":
            cycles.append((planned, epochs))
    elif epochs < planned:
        cycles = [(start, min(end, epochs)) for start, end in cycles if start < epochs]
    if cycles == [(0, epochs)] and not config.train.cycles:
        return config  # one cycle over the run: the plan of a run never extended
    return attrs.evolve(config, train=attrs.evolve(config.train, cycles=tuple(cycles)))


def _restore_modules(run: RunState, state: dict[str, Any], source: Path) -> None:
    """Load each component's saved state (into this rank's shards of a sharded one); a
    mismatch names the component and the backbone."""
    for key, module in run.parts.modules().items():
        if module is None or state[key] is None:
            continue  # no target update, or a view generator whose state was not saved
        try:
            load_full_state(module, state[key])
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            first = lines[1].strip() if len(lines) > 1 else str(exc)
            raise CheckpointError(
                f"the {key} in {str(source)!r} does not match this run's model "
                f"(backbone {run.config.model.backbone!r}): {first}"
            ) from None


def _check_same_epochs(run: RunState, state: dict[str, Any], source: Path) -> None:
    """Refuse to resume with settings that change the steps of an epoch (the batch size,
    ``train.max_steps_per_epoch``, the data): the step count, the schedules and the place
    inside an epoch all rest on them. A checkpoint that does not know its steps per epoch or
    its batch size (``None``: one of version 1 that did not tell) passes."""
    steps, batch = len(run.loader), run.config.train.batch_size
    saved_steps, saved_batch = state["steps_per_epoch"], state["batch_size"]
    differences = []
    if saved_batch is not None and saved_batch != batch:
        differences.append(f"its batch size is {saved_batch}, these settings make it {batch}")
    if saved_steps is not None and saved_steps != steps:
        differences.append(f"its epochs have {saved_steps} steps, these settings make them {steps}")
    if differences:
        raise ConfigError(
            f"cannot resume the run in {str(source)!r}: {'; '.join(differences)}. A run keeps "
            f"the steps of its epochs to the end: resume with the run's own settings (leave "
            f"out --batch-size, --data and --set train.max_steps_per_epoch=...), or start a "
            f"new run with another --out"
        )
