"""The training loop: set-up, epochs, steps, checkpoints, resume, and the end of a run.

``train(config, registry)`` loads the data, assembles the run's parts (``sslplug.assembly``)
and trains. After every epoch it writes ``last.pt`` atomically, so a crash or a kill loses at
most the epoch in progress; ``train(..., resume=RUN_DIR)`` continues from it. Everything else a
run shows (TensorBoard, the progress bar, the kNN monitor, the view grid) is done by lifecycle
plugins (``sslplug.monitors``), which the user may switch off. The run folder holds
``settings.toml`` (the resolved settings), ``last.pt`` and, at the end, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w
import torch
from torch import nn
from tqdm import tqdm

from sslplug import distributed
from sslplug.assembly import Assembly, assemble
from sslplug.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from sslplug.components import LossResult, Outputs, Views
from sslplug.config import RunConfig, RunContext
from sslplug.data import DataSet, Loader, load_data
from sslplug.errors import CheckpointError, ConfigError, PluginError, SslplugError
from sslplug.optim import Optimization
from sslplug.plugins import Components, Lifecycle, PluginRegistry
from sslplug.runtime import (
    autocast_context,
    place,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "NonFiniteLossError",
    "autocast_context",
    "place",
    "resolve_device",
    "set_rng_state",
    "train",
    "train_step",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(SslplugError):
    """The loss became NaN or infinite."""


def _default_out(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.components.plugin}-{stamp}"


@attrs.define
class _Run:
    """What the loop holds; kept together so that checkpointing sees all of it."""

    config: RunConfig
    data: DataSet
    loader: Loader
    assembly: Assembly
    lifecycle: Lifecycle
    out_dir: Path
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = attrs.Factory(list)
    epoch_loss_sum: float = 0.0  # of the steps of an unfinished epoch, for a mid-epoch resume
    started: float = attrs.Factory(time.perf_counter)

    @property
    def context(self) -> RunContext:
        return self.assembly.context

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

    def state(self) -> dict[str, Any]:
        modules = {
            name: (m.state_dict() if m is not None else None)
            for name, m in self.parts.modules().items()
        }
        baseline = self.context.baseline
        return {
            **modules,
            **self.optimization.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng_state(),
            "rng_per_rank": distributed.gather_objects(rng_state()),
            "settings": _settings(self.config),
            "components": dict(self.context.components),
            "history": self.history,
            "baseline": dict(baseline),
            "knn_baseline": baseline.get("knn_top1"),
            "feature_dim": self.parts.encoder.feature_dim,
            "image_size": self.context.image_size,
            "init_rng": self.assembly.init_rng,
            "epoch_loss_sum": self.epoch_loss_sum,
        }

    def restore(self, state: dict[str, Any], source: Path) -> None:
        if state.get("components") != self.context.components:
            raise CheckpointError(
                f"{str(source)!r} was written by components {state.get('components')}, not "
                f"{self.context.components}"
            )
        for key, module in self.parts.modules().items():
            if module is None or state.get(key) is None:
                continue  # "views" is absent from checkpoints written before it was saved
            try:
                module.load_state_dict(state[key])
            except RuntimeError as exc:
                lines = str(exc).splitlines()
                first = lines[1].strip() if len(lines) > 1 else str(exc)
                raise CheckpointError(
                    f"the {key} in {str(source)!r} does not match this run's model "
                    f"(backbone {self.config.model.backbone!r}): {first}"
                ) from None
        self.optimization.load_state_dict(state)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state.get("history", []))
        baseline = state.get("baseline")
        if baseline is None and state.get("knn_baseline") is not None:
            baseline = {"knn_top1": state["knn_baseline"]}
        self.context.baseline = dict(baseline or {})
        self.assembly.init_rng = state.get("init_rng", self.assembly.init_rng)
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == distributed.world_size():
            set_rng_state(per_rank[distributed.rank()])
        else:  # saved with another number of ranks: a fresh stream per rank and step
            set_rng_state(state["rng"])
            if distributed.is_distributed():
                torch.manual_seed(self.config.train.seed * 7919 + distributed.rank() + self.step)


def _settings(config: RunConfig) -> dict[str, Any]:
    """The settings a run saves: the core sections and those of the plugins it uses."""
    return config.to_dict(config.used_plugin_sections())


def _write_settings(config: RunConfig, components: dict[str, str], out_dir: Path) -> None:
    settings = _settings(config)
    settings["components"].update(components)
    (out_dir / "settings.toml").write_text(tomli_w.dumps(settings))


class ComponentFailure(PluginError):
    """A component raised during training."""


@contextlib.contextmanager
def blame(component: str, names: Mapping[str, str]) -> Iterator[None]:
    """Turn an exception raised inside ``component`` into one that names its plugin."""
    try:
        yield
    except (SslplugError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if component not in names:
            raise
        raise ComponentFailure(
            f"plugin {names[component]!r} raised in its {component}: {exc!r}"
        ) from exc


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


def _loss_result(result: Any, plugin: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its metrics from what a loss returned, or an error that says what the
    contract expects."""
    if isinstance(result, LossResult):
        loss, metrics = result.loss, result.metrics
    elif isinstance(result, tuple) and len(result) == 2:
        loss, metrics = result
    else:
        raise ComponentFailure(
            f"plugin {plugin!r}'s loss returned {type(result).__name__}; a loss returns "
            f"sslplug.LossResult(loss, metrics) (or the tuple (loss, metrics))"
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not isinstance(metrics, dict):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ComponentFailure(
            f"plugin {plugin!r}'s loss returned a loss of shape {shape} and metrics of type "
            f"{type(metrics).__name__}; expected a scalar tensor and a dict of scalar tensors"
        )
    return loss, metrics


def train_step(
    components: Components,
    optimization: Optimization,
    views: Views,
    step: int,
    total_steps: int,
    autocast: contextlib.AbstractContextManager,
    names: Mapping[str, str] | None = None,
    wrapped: Mapping[str, nn.Module] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """One optimisation step on ``views``: forward, loss, backward, the optimiser step (with
    the components' rules) and the target update. Returns the detached loss, the loss's metrics
    and the target's metrics; nothing is read back to the host. ``names`` (component -> plugin)
    lets an exception raised inside a component name the plugin that raised it; ``wrapped``
    holds the DDP wrappers of the encoder and the loss, which the forward pass goes through when
    training on many ranks."""
    encoder, loss_fn, target_update = components.encoder, components.loss, components.target_update
    names, wrapped = names or {}, wrapped or {}
    with autocast:
        with blame("encoder", names):
            outputs = wrapped.get("encoder", encoder)(views)
        _expect(isinstance(outputs, Outputs), "encoder", names, "sslplug.Outputs", outputs)
        target = None
        if target_update is not None:
            with torch.no_grad(), blame("target_update", names):
                target = target_update(views.select(target_update.reads))
        with blame("loss", names):
            result = wrapped.get("loss", loss_fn)(outputs, views, target)
    loss, metrics = _loss_result(result, names.get("loss", "?"))
    optimization.zero_grad()
    loss.backward()
    optimization.step(step)
    target_metrics: Any = {}
    if target_update is not None:
        with blame("target_update", names):
            target_metrics = target_update.step(encoder, step, total_steps)
        _expect(
            isinstance(target_metrics, dict | None),
            "target_update",
            names,
            "a dict of scalar metrics (or None) from step()",
            target_metrics,
        )
    return loss.detach(), metrics, target_metrics or {}


def _expect(ok: bool, component: str, names: Mapping[str, str], what: str, got: Any) -> None:
    if not ok:
        raise ComponentFailure(
            f"plugin {names.get(component, '?')!r}'s {component.replace('_', ' ')} returned "
            f"{type(got).__name__}; the contract expects {what}"
        )


def _scalars(metrics: Mapping[str, Any], component: str, names: Mapping[str, str]) -> dict:
    """Metrics as Python floats; a metric that is not a scalar names its plugin."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ComponentFailure(
                f"plugin {names.get(component, '?')!r}'s {component.replace('_', ' ')} logged the "
                f"metric {key!r} of shape {shape}; metrics must be scalars (a 0-d tensor or a "
                f"number)"
            ) from None
    return out


def _set_up(
    config: RunConfig, registry: PluginRegistry, resume: str | Path | None
) -> tuple[_Run, dict[str, Any] | None]:
    """Data, loader, the run's parts, and the checkpoint to continue from."""
    device = distributed.start(config.train.device) or resolve_device(config.train.device)
    world = distributed.world_size()
    if config.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is the batch of all {world} ranks "
            f"together and must be a multiple of {world}"
        )
    checkpoint = load_checkpoint(resume) if resume is not None else None
    out_dir = Path(resume) if resume is not None and Path(resume).is_dir() else None
    out_dir = out_dir or Path(config.train.out or _default_out(config))
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.train.seed)
    data = load_data(config.data, seed=config.train.seed)
    if len(data.train) < config.train.batch_size:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is larger than the {len(data.train)} "
            f"training images of {data.name!r}; use a batch size of at most {len(data.train)}"
        )
    loader = Loader(
        data.train,
        config.train.batch_size,
        device,
        shuffle=True,
        drop_last=True,
        seed=config.train.seed,
        workers=config.data.workers,
        max_batches=config.train.max_steps_per_epoch,
        rank=distributed.rank(),
        world_size=world,
    )
    assembly = assemble(
        config,
        registry,
        image_size=data.image_size,
        device=device,
        num_classes=data.num_classes,
        steps_per_epoch=len(loader),
        total_steps=len(loader) * config.train.epochs,
        out_dir=out_dir,
        data=data,
    )
    if world > 1:  # the same weights everywhere, but each rank draws its own augmentations
        torch.manual_seed(config.train.seed * 7919 + distributed.rank())
    used = set(assembly.context.components.values())
    lifecycle = registry.lifecycle(config.train.disable, used)
    return _Run(config, data, loader, assembly, lifecycle, out_dir), checkpoint


def _begin(run: _Run, checkpoint: dict[str, Any] | None, resume: str | Path | None) -> None:
    """Restore a checkpoint, save the settings, measure the random initialisation, and call
    the run-start hooks."""
    if checkpoint is not None:
        run.restore(checkpoint, Path(str(resume)))
        log.info("resumed from %s at epoch %d, step %d", resume, run.epoch, run.step)
    run.context.progress.step, run.context.progress.epoch = run.step, run.epoch
    if not distributed.is_main():
        return
    _write_settings(run.config, run.context.components, run.out_dir)
    if run.epoch == 0 and run.step == 0 and not run.context.baseline:
        run.context.baseline = run.lifecycle.evaluate(run.context, 0)
    run.lifecycle.run_start(run.context)


def _train_epoch(run: _Run, epoch: int, stop: _StopRequest) -> dict[str, float]:
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
    for images, _ in itertools.islice(run.loader.epoch(epoch), done, None):
        context.progress.step, context.progress.epoch = run.step, epoch
        try:
            with torch.no_grad(), blame("views", context.components):
                views = parts.views(images)
            _expect(isinstance(views, Views), "views", context.components, "sslplug.Views", views)
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
            context.progress.step = run.step
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
    }


def _stop_now(run: _Run, epoch: int, loss_sum: torch.Tensor, stop: _StopRequest) -> None:
    """A stop was asked for: checkpoint the steps done so far and interrupt."""
    run.epoch_loss_sum = loss_sum.item()
    state = run.state()
    if distributed.is_main():
        save_checkpoint(state, run.checkpoint)
    steps = len(run.loader)
    _print(
        f"{stop.requested or 'SIGTERM'}: stopped after step {run.step} (epoch {epoch + 1}, "
        f"step {run.step - epoch * steps} of {steps}); checkpoint written to "
        f"{str(run.checkpoint)!r}. Continue with: sslplug run --resume {run.out_dir}"
    )
    raise KeyboardInterrupt


def _log_step(
    run: _Run,
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
    scalars = {
        "loss": value,
        "lr": run.optimization.last_lr(),
        "images_per_second": images_per_second,
        **_scalars(metrics, "loss", names),
        **_scalars(target_metrics, "target_update", names),
    }
    if distributed.is_main():
        run.lifecycle.step_end(run.context, run.step, scalars)


def _end_epoch(run: _Run, epoch: int, measured: dict[str, float]) -> None:
    """Check the epoch's loss, evaluate, checkpoint, and call the epoch-end hooks."""
    run.epoch = epoch + 1
    run.context.progress.step, run.context.progress.epoch = run.step, run.epoch
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
    run.history.append(metrics)
    run.epoch_loss_sum = 0.0
    if distributed.world_size() > 1:
        _check_ranks_agree(run.parts, run.epoch)
    state = run.state()  # on every rank: it gathers each rank's random-number state
    if distributed.is_main():
        save_checkpoint(state, run.checkpoint)
        run.lifecycle.epoch_end(run.context, run.epoch, metrics)


def _summary(run: _Run) -> dict[str, Any]:
    knn_points = [h for h in run.history if "knn_top1" in h]
    return {
        "run_dir": str(run.out_dir),
        "data": run.data.name,
        "backbone": run.config.model.backbone,
        "components": dict(run.context.components),
        "epochs": run.epoch,
        "steps": run.step,
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "knn_top1": knn_points[-1]["knn_top1"] if knn_points else None,
        "knn_top1_random_init": run.context.baseline.get("knn_top1"),
        "knn_history": [{"epoch": h["epoch"], "top1": h["knn_top1"]} for h in knn_points],
        "baseline": dict(run.context.baseline),
        "images_per_second_median": _median(run.history, "images_per_second"),
        "data_wait_share_median": _median(run.history, "data_wait_share"),
        "wall_seconds_this_session": time.perf_counter() - run.started,
        "skipped_images": run.data.skipped + run.loader.skipped,
    }


def train(
    config: RunConfig,
    registry: PluginRegistry,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Pre-train an encoder as ``config`` says; return the summary (also in ``summary.json``)."""
    run, checkpoint = _set_up(config, registry, resume)
    main = distributed.is_main()
    error: BaseException | None = None
    summary: dict[str, Any] | None = None
    try:
        with _StopRequest() as stop:
            _begin(run, checkpoint, resume)
            for epoch in range(run.epoch, config.train.epochs):
                _end_epoch(run, epoch, _train_epoch(run, epoch, stop))
        summary = _summary(run)
        if main:
            (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    except BaseException as exc:
        error = exc
        raise
    finally:
        if main:
            _end_run(run, summary, error)


def _end_run(run: _Run, summary: dict[str, Any] | None, error: BaseException | None) -> None:
    """The run-end hooks; when the run already failed, their own failure is reported beside
    the run's error instead of hiding it."""
    try:
        run.lifecycle.run_end(run.context, summary or _summary(run), error)
    except Exception as exc:
        if error is None:
            raise
        log.error("%s (while ending a run that failed with %r)", exc, error)


def _median(history: list[dict[str, float]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return statistics.median(values) if values else None


def _print(text: str) -> None:
    if distributed.is_main():
        tqdm.write(text, file=sys.stderr)


def _check_ranks_agree(components: Components, epoch: int) -> None:
    """Every rank must hold the same encoder and target network (DDP keeps the encoder in step;
    the target follows it by EMA); a difference means a bug, so stop rather than train on."""
    modules = {"encoder": components.encoder, "target_update": components.target_update}
    sums = {
        name: float(sum(p.detach().double().sum() for p in module.parameters()))
        for name, module in modules.items()
        if module is not None
    }
    everyone = distributed.gather_objects(sums)
    for name in sums:
        values = [rank_sums[name] for rank_sums in everyone]
        if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
            raise SslplugError(
                f"after epoch {epoch} the {name} differs between ranks (parameter sums "
                f"{values}); the ranks have diverged"
            )
