"""The training loop: set-up, epochs, steps, checkpoints, and the end of a run.

``train(config, registry)`` loads the data, assembles the run's parts (``sslplug.assembly``)
and trains. After every epoch it writes ``last.pt`` atomically, so a crash or a kill loses at
most the epoch in progress; ``train(..., resume=RUN_DIR)`` continues from it
(``sslplug.resume`` says what resuming checks, restores and guarantees). With
``train.max_minutes``, a session ends after the epoch in which that time ran out, which is
checkpointed and evaluated as a run's last. Everything else a run shows (TensorBoard, the
progress bar, the kNN monitor, the view grid) is done by lifecycle plugins
(``sslplug.monitors``), which the user may switch off. The run folder holds
``settings.toml`` (the resolved settings), ``last.pt`` and, at the end, ``summary.json``
(``sslplug.report``); a run holds its lock from set-up to the end (``sslplug.rundir``) and
refuses a folder that holds another run unless told to overwrite it.

The loop is the only writer of the run's step and epoch, which live in
``RunContext.progress`` (``sslplug.run_state``); one optimisation step is
``sslplug.step.train_step``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from sslplug import distributed
from sslplug.assembly import assemble
from sslplug.checkpoint import CheckpointWriteError, save_checkpoint
from sslplug.components import Views
from sslplug.config import RunConfig
from sslplug.data import SOURCES, DataSet, Loader, load_data
from sslplug.errors import ConfigError, SslplugError
from sslplug.fsdp import check_strategy, is_sharded
from sslplug.outputs import check_name_lengths, check_outside_data, write_atomically
from sslplug.plugins import Components, PluginRegistry
from sslplug.report import data_line, say, say_epoch, say_stopped, say_time_limit, summary
from sslplug.resume import (
    extended_cycles,
    make_folder_ready,
    restore,
    resume_point,
    resumes_in,
    run_folder,
)
from sslplug.run_state import RunState, write_settings
from sslplug.rundir import RunFolder, RunFolderError
from sslplug.runtime import (
    autocast_context,
    compile_components,
    compile_failures,
    keep_freed_memory,
    place,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_rng_state,
)
from sslplug.step import ComponentFailure, blame, expect, scalars, train_step

__all__ = [
    "ComponentFailure",
    "NonFiniteLossError",
    "autocast_context",
    "data_line",
    "place",
    "resolve_device",
    "set_rng_state",
    "train",
    "train_step",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(SslplugError):
    """The loss became NaN or infinite."""


class _StopRequest:
    """SIGTERM, or a first Ctrl-C, asks the loop to stop after the step in progress; a second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(
    config: RunConfig,
    registry: PluginRegistry,
    resume: str | Path | None = None,
    overwrite: bool = False,
    ignore_collapse: bool = False,
) -> dict[str, Any]:
    """Pre-train an encoder as ``config`` says; return the summary (also in ``summary.json``).

    ``resume`` continues the run in that folder (or from that checkpoint file), keeping the
    evaluations its ``summary.json`` holds; a run that ``train.stop_on_collapse`` stopped is
    continued only with ``ignore_collapse``, which also switches ``stop_on_collapse`` off for
    the rest of the run. A new run refuses a ``train.out`` that holds a run, unless
    ``overwrite``: then that run's files are deleted first."""
    if resume is not None and ignore_collapse:
        config = attrs.evolve(config, train=attrs.evolve(config.train, stop_on_collapse=False))
    out = run_folder(config, resume)
    if not resumes_in(RunFolder(out), resume):
        _check_new_run_folder(config, out)
    with RunFolder(out) as folder:
        run, checkpoint = _set_up(config, registry, resume, folder, overwrite, ignore_collapse)
        main = distributed.is_main()
        error: BaseException | None = None
        result: dict[str, Any] | None = None
        try:
            compiled = config.train.compile
            with _StopRequest() as stop, compile_failures(run.context.device, compiled):
                _begin(run, checkpoint, resume)
                began = run.clock = time.perf_counter()
                for epoch in range(run.epoch, config.train.epochs):
                    measured = _train_epoch(run, epoch, stop)
                    last = epoch + 1 == config.train.epochs
                    run.out_of_time = _time_is_up(config, began) and not last
                    if run.out_of_time:  # this epoch is the run's last: the monitors see so
                        run.progress.total_steps = run.step
                    _end_epoch(run, epoch, measured)
                    if run.out_of_time:
                        say_time_limit(run, began)
                        break
                    if run.stop_requested:
                        say_stopped(run)
                        break
            result = summary(run)
            if main:
                text = json.dumps(result, indent=2) + "\n"
                write_atomically({run.out_dir / "summary.json": text.encode()})
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            if main:
                _end_run(run, result, error)


def _time_is_up(config: RunConfig, began: float) -> bool:
    """Whether ``train.max_minutes`` of this session's training have passed; every rank
    gets the same answer, so that all stop after the same epoch."""
    limit = config.train.max_minutes
    return distributed.any_rank(bool(limit) and time.perf_counter() - began >= 60 * limit)


def _set_up(
    config: RunConfig,
    registry: PluginRegistry,
    resume: str | Path | None,
    folder: RunFolder,
    overwrite: bool,
    ignore_collapse: bool = False,
) -> tuple[RunState, dict[str, Any] | None]:
    """Lock the run folder, then: the checkpoint to continue from and what the run's
    ``summary.json`` keeps across a resume (``sslplug.resume``), data, loader, the run's parts,
    and the folder made ready for the run."""
    device = distributed.start(config.train.device) or resolve_device(config.train.device)
    world = distributed.world_size()
    if config.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is the batch of all {world} ranks "
            f"together and must be a multiple of {world}"
        )
    for line in check_strategy(config, world):  # train.strategy=fsdp: refuse what it cannot do
        say(line)
    _on_main(folder.lock, folder)
    checkpoint, evaluations = resume_point(folder, resume, ignore_collapse)
    config = extended_cycles(config, checkpoint)
    seed_everything(config.train.seed)
    if config.train.keep_freed_memory:
        keep_freed_memory()
    data = load_data(config.data, seed=config.train.seed)
    loader = _loader(config, data, device)
    assembly = assemble(
        config,
        registry,
        image_size=data.image_size,
        device=device,
        num_classes=data.num_classes,
        steps_per_epoch=len(loader),
        total_steps=len(loader) * config.train.epochs,
        out_dir=folder.path,
        data=data,
        start_weights=checkpoint is None,  # a resume's weights come from its checkpoint
    )
    # a view generator that crops at the stored resolution gets the stored pixels
    loader.full_resolution = bool(getattr(assembly.parts.views, "full_resolution", False))
    if world > 1:  # the same weights everywhere, but each rank draws its own augmentations
        torch.manual_seed(config.train.seed * 7919 + distributed.rank())
    if config.train.compile:
        compile_components(assembly.parts)
    used = set(assembly.context.components.values())
    lifecycle = registry.lifecycle(config.train.disable, used)
    # the settings are good: now the folder may be changed
    _on_main(lambda: make_folder_ready(folder, resume, checkpoint, overwrite), folder)
    run = RunState(assembly, lifecycle, data, loader, evaluations=evaluations)
    return run, checkpoint


def _loader(config: RunConfig, data: DataSet, device: torch.device) -> Loader:
    """The loader of this rank's share of the training images, in batches of ``train``'s."""
    if len(data.train) < config.train.batch_size:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is larger than the {len(data.train)} "
            f"training images of {data.name!r}; use a batch size of at most {len(data.train)}"
        )
    return Loader(
        data.train,
        config.train.batch_size,
        device,
        shuffle=True,
        drop_last=True,
        seed=config.train.seed,
        workers=config.data.workers,
        max_batches=config.train.max_steps_per_epoch,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )


def _check_new_run_folder(config: RunConfig, out: Path) -> None:
    """Before anything is written: refuse a run folder with a name too long for its file
    system, and one that is the data folder or lies inside it (its ``views.png`` would be read
    as an image by the next run on that data)."""
    what = "--out" if config.train.out else "the default run folder"
    check_name_lengths(out, what)
    if config.data.name not in SOURCES:  # a path
        check_outside_data(out, config.data.name, what, "--data", "--out")


def _on_main(action: Callable[[], None], folder: RunFolder) -> None:
    """Run ``action`` on rank 0 alone, which alone writes in the run folder; when it fails,
    every rank stops."""
    error: SslplugError | None = None
    if distributed.is_main():
        try:
            action()
        except SslplugError as exc:
            error = exc
    if distributed.any_rank(error is not None):
        raise error or RunFolderError(
            f"rank 0 could not use the run folder {str(folder.path)!r}; its message says why"
        )


def _begin(run: RunState, checkpoint: dict[str, Any] | None, resume: str | Path | None) -> None:
    """Restore a checkpoint, save the settings, measure the random initialisation, and call
    the run-start hooks."""
    if checkpoint is not None:
        restore(run, checkpoint, Path(str(resume)))
    if not distributed.is_main():
        return
    train = run.config.train
    precision = resolve_precision(train.precision, torch.device(run.context.device))
    compiled = "; torch.compile on (the first steps compile the model)" if train.compile else ""
    say(data_line(run.data))
    say(f"{precision}{compiled}")
    write_settings(run)
    if run.epoch == 0 and run.step == 0 and not run.context.baseline:
        run.context.baseline = run.lifecycle.evaluate(run.context, 0)
    run.lifecycle.run_start(run.context)


def _train_epoch(run: RunState, epoch: int, stop: _StopRequest) -> dict[str, float]:
    """One epoch of steps (the rest of it, when resuming inside it); the epoch's metrics."""
    config, parts, context = run.config, run.parts, run.context
    for module in parts.modules().values():
        if module is not None:
            module.train()
    steps_per_epoch = len(run.loader)
    autocast = autocast_context(config.train.precision, torch.device(context.device))
    run.loader.wait_seconds = 0.0
    epoch_start = time.perf_counter()
    done = run.step - epoch * steps_per_epoch  # > 0 when resuming inside this epoch
    loss_sum = torch.full((), run.epoch_loss_sum if done else 0.0, device=context.device)
    window_start, window_images = time.perf_counter(), 0
    for images, _, *rest in itertools.islice(run.loader.epoch(epoch), done, None):
        extents = rest[0] if rest else None  # images of their own sizes (full_resolution)
        try:
            with torch.no_grad(), blame("views", context.components):
                views = parts.views(images) if extents is None else parts.views(images, extents)
            expect(isinstance(views, Views), "views", context.components, "sslplug.Views", views)
            loss, metrics, target_metrics = train_step(
                parts,
                run.optimization,
                views,
                run.step,
                context.total_steps,
                autocast,
                context.components,
                run.assembly.wrapped,
            )
            loss_sum += loss
            run.step += 1
            window_images += images.shape[0]
            if distributed.any_rank(stop.requested is not None):
                _stop_now(run, epoch, loss_sum, stop)
            last = run.step == (epoch + 1) * steps_per_epoch
            if run.step % config.train.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                _log_step(run, epoch, loss, metrics, target_metrics, window_images / elapsed)
                window_start, window_images = time.perf_counter(), 0
        except ComponentFailure as exc:
            raise ComponentFailure(
                f"{exc} at step {run.step + 1} (epoch {epoch + 1}). The last checkpoint, "
                f"{str(run.checkpoint)!r} at epoch {run.epoch}, is intact: fix the plugin and "
                f"continue with `sslplug run --resume {run.out_dir}`"
            ) from exc.__cause__
    seconds = time.perf_counter() - epoch_start
    return {
        "loss_sum": float(loss_sum.item()),
        "images_per_second": (steps_per_epoch - done) * config.train.batch_size / seconds,
        "data_wait_share": run.loader.wait_seconds / seconds,
        "seconds": seconds,
    }


def _stop_now(run: RunState, epoch: int, loss_sum: torch.Tensor, stop: _StopRequest) -> None:
    """A stop was asked for: checkpoint the steps done so far and interrupt."""
    run.epoch_loss_sum = loss_sum.item()
    state = run.checkpoint_state()
    if distributed.is_main():
        _save(run, state)
    steps = len(run.loader)
    say(
        f"{stop.requested or 'SIGTERM'}: stopped after step {run.step} (epoch {epoch + 1}, "
        f"step {run.step - epoch * steps} of {steps}); checkpoint written to "
        f"{str(run.checkpoint)!r}. Continue with: sslplug run --resume {run.out_dir}"
    )
    raise KeyboardInterrupt


def _log_step(
    run: RunState,
    epoch: int,
    loss: torch.Tensor,
    metrics: Mapping[str, Any],
    target_metrics: Mapping[str, Any],
    images_per_second: float,
) -> None:
    """Read the loss back, check it, and hand the step's metrics to the step-end hooks."""
    value = distributed.mean_over_ranks(loss.item())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the loss is {value} at step {run.step} (epoch {epoch + 1}); the last good "
            f"checkpoint is {str(run.checkpoint)!r} at epoch {run.epoch}. Lower optim.lr or "
            f"check the components' settings"
        )
    names = run.context.components
    logged = {
        "loss": value,
        "lr": run.optimization.last_lr(),
        "images_per_second": images_per_second,
        **scalars(metrics, "loss", names),
        **scalars(target_metrics, "target_update", names),
    }
    if distributed.is_main():
        run.lifecycle.step_end(run.context, run.step, logged)


def _end_epoch(run: RunState, epoch: int, measured: dict[str, float]) -> None:
    """Check the epoch's loss, evaluate, checkpoint, and call the epoch-end hooks."""
    run.epoch = epoch + 1
    mean_loss = distributed.mean_over_ranks(measured["loss_sum"] / len(run.loader))
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"the mean loss of epoch {run.epoch} is {mean_loss}; the last good checkpoint is "
            f"{str(run.checkpoint)!r} at epoch {run.epoch - 1}. Lower optim.lr"
        )
    metrics: dict[str, float] = {
        "epoch": run.epoch,
        "loss": mean_loss,
        "images_per_second": measured["images_per_second"],
        "data_wait_share": measured["data_wait_share"],
    }
    if distributed.is_main():
        metrics.update(run.lifecycle.evaluate(run.context, run.epoch))
    metrics.update(_elapsed(run, measured["seconds"]))
    run.history.append(metrics)
    run.epoch_loss_sum = 0.0
    if distributed.world_size() > 1:
        _check_ranks_agree(run.parts, run.epoch)
    # a lifecycle plugin may have asked to stop (RunContext.request_stop): all ranks agree
    run.stop_requested = distributed.any_rank(bool(run.context.stop_reason))
    save = not distributed.any_rank(not run.context.stop_saves)
    if save:
        state = run.checkpoint_state()  # on every rank: it gathers each rank's random state
    if distributed.is_main():
        if save:
            _save(run, state)
        run.lifecycle.epoch_end(run.context, run.epoch, metrics)
        say_epoch(run, metrics)  # the run's report, whichever plugins are switched off


def _elapsed(run: RunState, seconds: float) -> dict[str, float]:
    """Seconds from the run's start to the end of this epoch, over all its sessions: of
    training steps (``train_seconds``, this epoch's ``seconds`` added), and of wall time with
    evaluation and checkpoints (``wall_seconds``, up to now)."""
    before = run.history[-1] if run.history else {}
    now = time.perf_counter()
    wall, run.clock = now - run.clock, now
    return {
        "train_seconds": before.get("train_seconds", 0.0) + seconds,
        "wall_seconds": before.get("wall_seconds", 0.0) + wall,
    }


def _save(run: RunState, state: dict[str, Any]) -> None:
    """Write the checkpoint; when the write fails, say what is kept and how to go on."""
    try:
        save_checkpoint(state, run.checkpoint)
    except CheckpointWriteError as exc:
        if run.saved is not None and run.checkpoint.is_file():
            epoch, step = run.saved
            kept = f"the previous checkpoint there, of epoch {epoch} (step {step}), is intact"
            then = f"continue with `sslplug run --resume {run.out_dir}`"
        else:
            kept = "no checkpoint of this run was written before it"
            then = f"`sslplug run --resume {run.out_dir}` starts the run over"
        raise CheckpointWriteError(f"{exc}; {kept}. When there is room again, {then}") from exc
    run.saved = (run.epoch, run.step)


def _end_run(run: RunState, result: dict[str, Any] | None, error: BaseException | None) -> None:
    """The run-end hooks; when the run already failed, their own failure is reported beside
    the run's error instead of hiding it."""
    try:
        run.lifecycle.run_end(run.context, result or summary(run), error)
    except Exception as exc:
        if error is None:
            raise
        log.error("%s (while ending a run that failed with %r)", exc, error)


def _check_ranks_agree(components: Components, epoch: int) -> None:
    """Every rank must hold the same encoder and target network (DDP keeps the encoder in step;
    the target follows it by EMA); a difference means a bug, so stop rather than train on.
    A sharded network (``train.strategy = "fsdp"``) holds each weight once, on one rank, and
    has nothing to compare: its ranks started from rank 0's weights (``sslplug.fsdp.shard``)."""
    modules = {"encoder": components.encoder, "target_update": components.target_update}
    sums = {
        name: float(sum(p.detach().double().sum() for p in module.parameters()))
        for name, module in modules.items()
        if module is not None and not is_sharded(module)
    }
    everyone = distributed.gather_objects(sums)
    for name in sums:
        values = [rank_sums[name] for rank_sums in everyone]
        if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
            raise SslplugError(
                f"after epoch {epoch} the {name} differs between ranks (parameter sums "
                f"{values}); the ranks have diverged"
            )
