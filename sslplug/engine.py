"""The training loop: set-up, epochs, steps, checkpoints, resume, and the end of a run.

``train(config, registry)`` loads the data, assembles the run's parts (``sslplug.assembly``)
and trains. After every epoch it writes ``last.pt`` atomically, so a crash or a kill loses at
most the epoch in progress; ``train(..., resume=RUN_DIR)`` continues from it. With
``train.max_minutes``, a session ends after the epoch in which that time ran out, which is
checkpointed and evaluated as a run's last. Everything else a run shows (TensorBoard, the
progress bar, the kNN monitor, the view grid) is done by lifecycle plugins
(``sslplug.monitors``), which the user may switch off. The run folder holds
``settings.toml`` (the resolved settings), ``last.pt`` and, at the end, ``summary.json`` (with
the evaluations ``eval`` and ``finetune`` recorded in it before a resume); a run holds its lock
from set-up to the end (``sslplug.rundir``), refuses a folder that holds another run unless
told to overwrite it, and refuses to resume with settings that change the steps of an epoch,
or to resume a run stopped for collapse without ``ignore_collapse``.
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w
import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from tqdm import tqdm

from sslplug import distributed
from sslplug.assembly import Assembly, assemble
from sslplug.checkpoint import (
    FILENAME,
    CheckpointWriteError,
    load_checkpoint,
    save_checkpoint,
    write_failure,
)
from sslplug.components import LossResult, Outputs, Views
from sslplug.config import RunConfig, RunContext
from sslplug.data import BUILTIN, DataSet, Loader, load_data
from sslplug.errors import CheckpointError, ConfigError, PluginError, SslplugError
from sslplug.health import COLLAPSE_SPREAD, HEALTH_MEASURES, collapse
from sslplug.optim import Optimization
from sslplug.outputs import (
    check_name_lengths,
    check_outside_data,
    read_summary,
    write_atomically,
)
from sslplug.plugins import Components, Lifecycle, PluginRegistry
from sslplug.rundir import RUN_FILES, RunFolder, RunFolderError
from sslplug.runtime import (
    autocast_context,
    compile_components,
    compile_failures,
    place,
    resolve_device,
    resolve_precision,
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
            "settings": _settings(self.config, self.lifecycle),
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

    def restore(self, state: dict[str, Any], source: Path) -> None:
        if state.get("components") != self.context.components:
            raise CheckpointError(
                f"{str(source)!r} was written by components {state.get('components')}, not "
                f"{self.context.components}"
            )
        self._check_same_epochs(state, source)
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
        self.saved = (self.epoch, self.step)
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

    def _check_same_epochs(self, state: dict[str, Any], source: Path) -> None:
        """Refuse to resume with settings that change the steps of an epoch (the batch size,
        ``train.max_steps_per_epoch``, the data): the step count, the schedules and the place
        inside an epoch all rest on them. A checkpoint written before these were saved tells
        its steps per epoch by its step and epoch when it ends an epoch; otherwise it passes."""
        steps, batch = len(self.loader), self.config.train.batch_size
        saved_steps = state.get("steps_per_epoch")
        epoch, step = int(state["epoch"]), int(state["step"])
        at_epoch_end = not state.get("epoch_loss_sum")  # no loss of an unfinished epoch saved
        if saved_steps is None and epoch > 0 and at_epoch_end and step % epoch == 0:
            saved_steps = step // epoch
        saved_train = state.get("settings", {}).get("train", {})
        saved_batch = state.get("batch_size", saved_train.get("batch_size"))
        differences = []
        if saved_batch is not None and saved_batch != batch:
            differences.append(f"its batch size is {saved_batch}, these settings make it {batch}")
        if saved_steps is not None and saved_steps != steps:
            differences.append(
                f"its epochs have {saved_steps} steps, these settings make them {steps}"
            )
        if differences:
            raise ConfigError(
                f"cannot resume the run in {str(source)!r}: {'; '.join(differences)}. A run keeps "
                f"the steps of its epochs to the end: resume with the run's own settings (leave "
                f"out --batch-size, --data and --set train.max_steps_per_epoch=...), or start a "
                f"new run with another --out"
            )


def _settings(config: RunConfig, lifecycle: Lifecycle) -> dict[str, Any]:
    """The settings a run saves: the core sections and those of the plugins it uses, for its
    components or through the lifecycle hooks."""
    return config.to_dict(config.used_plugin_sections(lifecycle.plugins))


def _write_settings(
    config: RunConfig, lifecycle: Lifecycle, components: dict[str, str], out_dir: Path
) -> None:
    settings = _settings(config, lifecycle)
    settings["components"].update(components)
    write_atomically({out_dir / "settings.toml": tomli_w.dumps(settings).encode()})


class ComponentFailure(PluginError):
    """A component raised during training."""


@contextlib.contextmanager
def blame(component: str, names: Mapping[str, str]) -> Iterator[None]:
    """Turn an exception raised inside ``component`` into one that names its plugin; a failure
    of ``torch.compile`` is not the plugin's and passes (``compile_failures`` says what it is)."""
    try:
        yield
    except (SslplugError, KeyboardInterrupt, TorchDynamoException):
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
    config: RunConfig,
    registry: PluginRegistry,
    resume: str | Path | None,
    folder: RunFolder,
    overwrite: bool,
    ignore_collapse: bool = False,
) -> tuple[_Run, dict[str, Any] | None]:
    """Lock the run folder, then: the checkpoint to continue from and what the run's
    ``summary.json`` keeps across a resume (refusing to continue a run stopped for collapse
    unless ``ignore_collapse``), data, loader, the run's parts, and the folder made ready for
    the run."""
    device = distributed.start(config.train.device) or resolve_device(config.train.device)
    world = distributed.world_size()
    if config.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is the batch of all {world} ranks "
            f"together and must be a multiple of {world}"
        )
    _on_main(folder.lock, folder)
    checkpoint = _checkpoint_to_resume(resume)
    resumed = {}
    if checkpoint is not None and _resumes_in(folder, resume):
        resumed = _resumed_summary(folder.path)
        _check_collapse_stop(resumed, checkpoint, folder.path, ignore_collapse)
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
        out_dir=folder.path,
        data=data,
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
    _on_main(lambda: _make_ready(folder, resume, checkpoint, overwrite), folder)
    run = _Run(config, data, loader, assembly, lifecycle, folder.path)
    run.evaluations = list(resumed.get("evaluations", []))
    return run, checkpoint


def _run_folder(config: RunConfig, resume: str | Path | None) -> Path:
    """A resumed run continues in its own folder; a new one goes to ``train.out``."""
    if resume is not None and Path(resume).is_dir():
        return Path(resume)
    return Path(config.train.out or _default_out(config))


def _check_new_run_folder(config: RunConfig, out: Path) -> None:
    """Before anything is written: refuse a run folder with a name too long for its file
    system, and one that is the data folder or lies inside it (its ``views.png`` would be read
    as an image by the next run on that data)."""
    what = "--out" if config.train.out else "the default run folder"
    check_name_lengths(out, what)
    if config.data.name not in BUILTIN:
        check_outside_data(out, config.data.name, what, "--data", "--out")


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


def _make_ready(
    folder: RunFolder,
    resume: str | Path | None,
    checkpoint: dict[str, Any] | None,
    overwrite: bool,
) -> None:
    """Clear the way for the run, saying what was removed: another run's files (only when
    ``overwrite``), the outputs of a start that never reached a checkpoint, temporary files of
    a checkpoint write cut short."""
    if not _resumes_in(folder, resume):
        removed = folder.start_new_run(overwrite)
        if removed:
            _print(f"--overwrite: removed the earlier run's {', '.join(removed)} in {folder.path}")
    elif checkpoint is None:
        removed = folder.remove(tuple(name for name in RUN_FILES if name != "settings.toml"))
        _print(
            f"{folder.path} holds a run stopped before its first checkpoint (no {FILENAME}): "
            f"starting it over from epoch 0 with its saved settings"
            + (f" (removed its {', '.join(removed)})" if removed else "")
        )
    stale = folder.remove_stale_temporaries()
    if stale:
        _print(
            f"removed {len(stale)} temporary file(s) of a checkpoint write that was cut short: "
            + ", ".join(str(path) for path in stale)
        )


def _resumes_in(folder: RunFolder, resume: str | Path | None) -> bool:
    """Whether ``resume`` (a run folder, or a checkpoint file in one) continues the run in
    ``folder``, rather than starting a new one there."""
    if resume is None:
        return False
    resumed_from = Path(resume)
    if not resumed_from.is_dir():
        resumed_from = resumed_from.parent  # a checkpoint file: its run's folder
    return resumed_from.resolve() == folder.path.resolve()


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
        _print(
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


def _begin(run: _Run, checkpoint: dict[str, Any] | None, resume: str | Path | None) -> None:
    """Restore a checkpoint, save the settings, measure the random initialisation, and call
    the run-start hooks."""
    if checkpoint is not None:
        run.restore(checkpoint, Path(str(resume)))
        log.info("resumed from %s at epoch %d, step %d", resume, run.epoch, run.step)
        planned = checkpoint.get("settings", {}).get("train", {}).get("epochs")
        epochs = run.config.train.epochs
        if planned is not None and planned != epochs and epochs > run.epoch:
            _print(
                f"train.epochs is now {epochs} (the run was set for {planned}): "
                f"the learning-rate and momentum schedules now run to the new end"
            )
    run.context.progress.step, run.context.progress.epoch = run.step, run.epoch
    run.context.history = run.history  # the same list: the epochs to come are added to it
    if not distributed.is_main():
        return
    train = run.config.train
    precision = resolve_precision(train.precision, torch.device(run.context.device))
    compiled = "; torch.compile on (the first steps compile the model)" if train.compile else ""
    _print(data_line(run.data))
    _print(f"{precision}{compiled}")
    _write_settings(run.config, run.lifecycle, run.context.components, run.out_dir)
    if run.epoch == 0 and run.step == 0 and not run.context.baseline:
        run.context.baseline = run.lifecycle.evaluate(run.context, 0)
    run.lifecycle.run_start(run.context)


def data_line(data: DataSet) -> str:
    """One line saying what a run trains on: the data set's name, its train and test images,
    its classes (or that it is unlabelled) and the unreadable files skipped so far."""

    def images(count: int, split: str) -> str:
        return f"{count} {split} image{'' if count == 1 else 's'}"

    test = images(len(data.test), "test") if data.test is not None else "no test split"
    if not data.train.labelled:
        labels = "unlabelled"
    else:
        labels = f"{data.num_classes} classes" if data.num_classes else "labelled"
    skipped = f", {data.skipped} unreadable file(s) skipped" if data.skipped else ""
    return f"data {data.name}: {images(len(data.train), 'train')}, {test}, {labels}{skipped}"


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
    for images, _, *rest in itertools.islice(run.loader.epoch(epoch), done, None):
        context.progress.step, context.progress.epoch = run.step, epoch
        extents = rest[0] if rest else None  # images of their own sizes (full_resolution)
        try:
            with torch.no_grad(), blame("views", context.components):
                views = parts.views(images) if extents is None else parts.views(images, extents)
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
        "seconds": seconds,
    }


def _stop_now(run: _Run, epoch: int, loss_sum: torch.Tensor, stop: _StopRequest) -> None:
    """A stop was asked for: checkpoint the steps done so far and interrupt."""
    run.epoch_loss_sum = loss_sum.item()
    state = run.state()
    if distributed.is_main():
        _save(run, state)
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
    metrics.update(_elapsed(run, measured["seconds"]))
    run.history.append(metrics)
    run.epoch_loss_sum = 0.0
    if distributed.world_size() > 1:
        _check_ranks_agree(run.parts, run.epoch)
    # a lifecycle plugin may have asked to stop (RunContext.request_stop): all ranks agree
    run.stop_requested = distributed.any_rank(bool(run.context.stop_reason))
    save = not distributed.any_rank(not run.context.stop_saves)
    if save:
        state = run.state()  # on every rank: it gathers each rank's random-number state
    if distributed.is_main():
        if save:
            _save(run, state)
        run.lifecycle.epoch_end(run.context, run.epoch, metrics)


def _elapsed(run: _Run, seconds: float) -> dict[str, float]:
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


def _save(run: _Run, state: dict[str, Any]) -> None:
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


def _summary(run: _Run) -> dict[str, Any]:
    knn_points = [h for h in run.history if "knn_top1" in h]
    train = run.config.train
    elapsed = ("train_seconds", "wall_seconds")  # absent from runs begun before they were kept
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
        "knn_history": [
            {"epoch": h["epoch"], "top1": h["knn_top1"], **{k: h[k] for k in elapsed if k in h}}
            for h in knn_points
        ],
        "health_history": [
            {"epoch": h["epoch"], **{k: h[k] for k in HEALTH_MEASURES if k in h}}
            for h in [{"epoch": 0, **run.context.baseline}, *run.history]
            if "rank_features" in h
        ],
        "baseline": dict(run.context.baseline),
        "images_per_second_median": _median(run.history, "images_per_second"),
        "data_wait_share_median": _median(run.history, "data_wait_share"),
        "wall_seconds_this_session": time.perf_counter() - run.started,
        "train_seconds": run.history[-1].get("train_seconds") if run.history else None,
        "epochs_planned": train.epochs,
        "stopped_by_time_limit": run.out_of_time,
        "stopped": run.context.stop_reason or None,
        "precision": resolve_precision(train.precision, torch.device(run.context.device)).name,
        "compile": train.compile,
        "skipped_images": run.data.skipped + run.loader.skipped,
        "stopped_for_collapse": _collapse_stop(run),
        "collapsed_epochs": [h["epoch"] for h in run.history if h.get("collapsed")],
        "evaluations": run.evaluations,
    }


def _collapse_stop(run: _Run) -> dict[str, Any] | None:
    """What ``summary.json`` keeps of a stop for collapse (``train.stop_on_collapse``): the
    epoch, the measure and its value, and the checkpoint kept (its epoch and step), from
    which a resume continues only with ``--ignore-collapse``. ``None`` for any other end."""
    last = run.history[-1] if run.history else {}
    if not (run.context.stop_reason and not run.context.stop_saves and last.get("collapsed")):
        return None
    found = collapse(last, run.history[-2] if len(run.history) > 1 else None)
    # the monitor's rule read the same two epochs, so ``found`` is what it warned of
    measure, value = found if found is not None else ("spread", None)
    kept_epoch, kept_step = run.saved if run.saved is not None else (None, None)
    return {
        "epoch": last["epoch"],
        "measure": measure,
        "value": value,
        "checkpoint_epoch": kept_epoch,
        "checkpoint_step": kept_step,
    }


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
    out = _run_folder(config, resume)
    if not _resumes_in(RunFolder(out), resume):
        _check_new_run_folder(config, out)
    with RunFolder(out) as folder:
        run, checkpoint = _set_up(config, registry, resume, folder, overwrite, ignore_collapse)
        main = distributed.is_main()
        error: BaseException | None = None
        summary: dict[str, Any] | None = None
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
                        run.context.progress.total_steps = run.step
                    _end_epoch(run, epoch, measured)
                    if run.out_of_time:
                        _print_time_limit(run, began)
                        break
                    if run.stop_requested:
                        _print_stop(run)
                        break
            summary = _summary(run)
            if main:
                text = json.dumps(summary, indent=2) + "\n"
                write_atomically({run.out_dir / "summary.json": text.encode()})
            return summary
        except BaseException as exc:
            error = exc
            raise
        finally:
            if main:
                _end_run(run, summary, error)


def _time_is_up(config: RunConfig, began: float) -> bool:
    """Whether ``train.max_minutes`` of this session's training have passed; every rank
    gets the same answer, so that all stop after the same epoch."""
    limit = config.train.max_minutes
    return distributed.any_rank(bool(limit) and time.perf_counter() - began >= 60 * limit)


def _print_stop(run: _Run) -> None:
    kept = (
        f"the checkpoint of epoch {run.saved[0]} is kept in {str(run.checkpoint)!r}"
        if run.saved is not None
        else "no checkpoint was written"
    )
    _print(f"stopped after epoch {run.epoch}: {run.context.stop_reason}; {kept}")


def _print_time_limit(run: _Run, began: float) -> None:
    minutes = (time.perf_counter() - began) / 60
    _print(
        f"train.max_minutes={run.config.train.max_minutes:g}: stopped after epoch {run.epoch} "
        f"of {run.config.train.epochs}, {minutes:.2f} minutes into this session; the "
        f"checkpoint of epoch {run.epoch} is in {str(run.checkpoint)!r}. Continue with: "
        f"sslplug run --resume {run.out_dir}"
    )


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
