"""The training loop: set-up, steps, logging, checkpoints, resume and evaluation.

``train(config, registry)`` builds the data, the backbone and the five components, checks them,
and trains. After every epoch it writes ``last.pt`` atomically, so a crash or a kill loses at
most the epoch in progress; ``train(..., resume=RUN_DIR)`` continues from it. The run folder
holds ``settings.toml`` (the resolved settings), ``last.pt``, ``views.png`` (what the model
sees), ``tensorboard/`` and, at the end, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
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
import torchvision
from torch import nn
from tqdm import tqdm

from sslplug import distributed
from sslplug.augment import denormalize
from sslplug.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from sslplug.config import RunConfig, RunContext
from sslplug.data import DataSet, Loader, Split, load_data
from sslplug.errors import CheckpointError, ConfigError, PluginError, SslplugError
from sslplug.evaluate import extract_features, knn_accuracy
from sslplug.nn import build_backbone
from sslplug.optim import build_optimizer, warmup_cosine
from sslplug.plugins import Components, PluginRegistry

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


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; anything else must be a valid torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is {name!r} but CUDA is not available here; use cpu or auto"
        )
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _default_out(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.components.plugin}-{stamp}"


@attrs.define
class _Run:
    """What the loop holds; kept together so checkpointing sees all of it."""

    config: RunConfig
    context: RunContext
    data: DataSet
    components: Components
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = attrs.Factory(list)
    knn_baseline: float | None = None
    init_rng: dict[str, Any] | None = None
    epoch_loss_sum: float = 0.0  # of the steps of an unfinished epoch, for a mid-epoch resume

    def trained_modules(self) -> dict[str, nn.Module | None]:
        return {
            "encoder": self.components.encoder,
            "loss": self.components.loss,
            "target_update": self.components.target_update,
        }

    def state(self) -> dict[str, Any]:
        modules = {
            k: (m.state_dict() if m is not None else None)
            for k, m in self.trained_modules().items()
        }
        return {
            **modules,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": _rng_state(),
            "rng_per_rank": distributed.gather_objects(_rng_state()),
            "settings": self.config.to_dict(),
            "components": dict(self.context.components),
            "history": self.history,
            "knn_baseline": self.knn_baseline,
            "feature_dim": self.components.encoder.feature_dim,
            "image_size": self.context.image_size,
            "init_rng": self.init_rng,
            "epoch_loss_sum": self.epoch_loss_sum,
        }

    def restore(self, state: dict[str, Any], source: Path) -> None:
        if state.get("components") != self.context.components:
            raise CheckpointError(
                f"{str(source)!r} was written by components {state.get('components')}, not "
                f"{self.context.components}"
            )
        for key, module in self.trained_modules().items():
            if module is None or state.get(key) is None:
                continue
            try:
                module.load_state_dict(state[key])
            except RuntimeError as exc:
                first = (
                    str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
                )
                raise CheckpointError(
                    f"the {key} in {str(source)!r} does not match this run's model "
                    f"(backbone {self.config.model.backbone!r}): {first}"
                ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state.get("history", []))
        self.knn_baseline = state.get("knn_baseline")
        self.init_rng = state.get("init_rng", self.init_rng)
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == distributed.world_size():
            set_rng_state(per_rank[distributed.rank()])
        else:  # saved with another number of ranks: a fresh stream per rank and step
            set_rng_state(state["rng"])
            if distributed.is_distributed():
                torch.manual_seed(self.config.train.seed * 7919 + distributed.rank() + self.step)


def _write_settings(config: RunConfig, components: dict[str, str], out_dir: Path) -> None:
    settings = config.to_dict()
    settings["components"].update(components)
    (out_dir / "settings.toml").write_text(tomli_w.dumps(settings))


def _save_view_grid(views: Any, out_dir: Path, writer: Any) -> None:
    rows = [denormalize(v[:8].float().cpu()) for v in views.images if v.dim() == 4]
    if not rows:
        return
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=8, padding=1)
    torchvision.utils.save_image(grid, out_dir / "views.png")
    writer.add_image("views", grid, 0)


def _evaluate(run: _Run, device: torch.device) -> float | None:
    data = run.data
    if data.test is None or not data.test.labelled or not data.train.labelled:
        return None
    settings = run.config.eval
    return knn_accuracy(
        run.components.encoder,
        data.train,
        data.test,
        data.num_classes,
        device,
        k=settings.knn_k,
        temperature=settings.knn_temperature,
    )


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


def place(components: Components, device: torch.device, channels_last: bool) -> None:
    """Move every component to ``device``, with channels-last weights when asked."""
    for module in (components.views, components.encoder, components.loss, components.target_update):
        if module is not None:
            module.to(device)
            if channels_last:
                module.to(memory_format=torch.channels_last)


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


class _NullWriter:
    """What ranks other than 0 log to: nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _wrap_for_ddp(
    components: Components, config: RunConfig, device: torch.device
) -> dict[str, nn.Module]:
    """DistributedDataParallel wrappers of the encoder and, when it has trainable weights, the
    loss; batch norm synchronised over ranks when ``train.sync_batchnorm`` asks."""
    from torch.nn.parallel import DistributedDataParallel

    if config.train.sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on "
                "the CPU); set it to false for CPU ranks"
            )
        components.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(components.encoder)
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped: dict[str, nn.Module] = {
        "encoder": DistributedDataParallel(components.encoder, device_ids=device_ids)
    }
    if any(p.requires_grad for p in components.loss.parameters()):
        wrapped["loss"] = DistributedDataParallel(components.loss, device_ids=device_ids)
    return wrapped


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` ``bf16``, or ``auto`` on CUDA; otherwise nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    components: Components,
    optimizer: torch.optim.Optimizer,
    views: Any,
    step: int,
    total_steps: int,
    autocast: contextlib.AbstractContextManager,
    names: Mapping[str, str] | None = None,
    wrapped: Mapping[str, nn.Module] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """One optimisation step on ``views``: forward, loss, backward, optimizer step and the
    target update. Returns the detached loss, the loss's metrics and the target's metrics;
    nothing is read back to the host. ``names`` (component -> plugin) lets an exception raised
    inside a component name the plugin that raised it; ``wrapped`` holds the DDP wrappers of
    the encoder and the loss, which the forward pass goes through when training on many ranks."""
    encoder, loss_fn, target_update = components.encoder, components.loss, components.target_update
    names, wrapped = names or {}, wrapped or {}
    forward_loss = wrapped.get("loss", loss_fn)
    with autocast:
        with blame("encoder", names):
            outputs = wrapped.get("encoder", encoder)(views)
        target = None
        if target_update is not None:
            with torch.no_grad(), blame("target_update", names):
                target = target_update(views)
        with blame("loss", names):
            loss, metrics = forward_loss(outputs, views, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    target_metrics = {}
    if target_update is not None:
        with blame("target_update", names):
            target_metrics = target_update.step(encoder, step, total_steps)
    return loss.detach(), metrics, target_metrics


def _write_embeddings(run: _Run, device: torch.device, writer: Any) -> None:
    """Test-set features with their labels and thumbnails, for TensorBoard's projector."""
    test, count = run.data.test, run.config.eval.embedding_samples
    if not count or test is None or not test.labelled:
        return
    index = torch.linspace(0, len(test) - 1, min(count, len(test))).long().unique()
    sample = Split(
        labels=test.labels[index],
        images=test.images[index] if test.images is not None else None,
        source=torch.utils.data.Subset(test.source, index.tolist())
        if test.images is None
        else None,
    )
    features, labels = extract_features(run.components.encoder, sample, device, workers=0)
    names = run.data.classes
    thumbnails = sample.images if sample.images is not None else None
    writer.add_embedding(
        features.cpu(),
        metadata=[names[i] if names else str(i) for i in labels.tolist()],
        label_img=thumbnails.float() / 255 if thumbnails is not None else None,
        global_step=run.step,
        tag="test_features",
    )


def train(
    config: RunConfig,
    registry: PluginRegistry,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Pre-train an encoder as ``config`` says; return the summary (also in ``summary.json``)."""
    from torch.utils.tensorboard import SummaryWriter

    device = distributed.start(config.train.device) or resolve_device(config.train.device)
    rank, world = distributed.rank(), distributed.world_size()
    main = distributed.is_main()
    if config.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} is the batch of all {world} ranks "
            f"together and must be a multiple of {world}"
        )
    checkpoint = load_checkpoint(resume) if resume is not None else None
    out_dir = Path(resume) if resume is not None and Path(resume).is_dir() else None
    out_dir = out_dir or Path(config.train.out or _default_out(config))
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(config.train.seed)

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
        rank=rank,
        world_size=world,
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.train.epochs
    context = RunContext(
        config=config,
        image_size=data.image_size,
        channels=3,
        num_classes=data.num_classes,
        device=device,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        out_dir=out_dir,
    )
    init_rng = _rng_state()  # so that evaluation can rebuild this exact random initialisation
    backbone, feature_dim = build_backbone(
        config.model.backbone, data.image_size, config.model.cifar_stem
    )
    components = registry.build(config, context, backbone, feature_dim)
    place(components, device, config.train.channels_last)

    wrapped = _wrap_for_ddp(components, config, device) if world > 1 else {}
    if world > 1:  # the same weights everywhere, but each rank draws its own augmentations
        torch.manual_seed(config.train.seed * 7919 + rank)
    params = [components.encoder, components.loss]
    optimizer = build_optimizer(config.optim, params)
    warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
    run = _Run(config, context, data, components, optimizer, scheduler, init_rng=init_rng)
    if checkpoint is not None:
        run.restore(checkpoint, Path(resume))
        log.info("resumed from %s at epoch %d, step %d", resume, run.epoch, run.step)
    if main:
        _write_settings(config, context.components, out_dir)

    autocast = autocast_context(config.train.precision, device)
    writer = (
        SummaryWriter(str(out_dir / "tensorboard"), purge_step=run.step or None)
        if main
        else _NullWriter()
    )
    if main:
        registry.run_start(context)
    encoder, loss_fn, target_update = components.encoder, components.loss, components.target_update

    if main and run.knn_baseline is None and config.eval.baseline and run.epoch == 0:
        run.knn_baseline = _evaluate(run, device)
        if run.knn_baseline is not None:
            writer.add_scalar("knn/top1", run.knn_baseline, 0)
            _print(f"kNN top-1 of the randomly initialised encoder: {run.knn_baseline:.2f}%")

    progress = tqdm(
        total=total_steps,
        initial=run.step,
        disable=not (config.train.progress and main),
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    run_start = time.perf_counter()
    last_loss = float("nan")
    names = context.components
    stop = _StopRequest()
    try:
        stop.__enter__()
        for epoch in range(run.epoch, config.train.epochs):
            encoder.train()
            loss_fn.train()
            if target_update is not None:
                target_update.train()
            loader.wait_seconds = 0.0
            epoch_start = time.perf_counter()
            done = run.step - epoch * steps_per_epoch  # > 0 when resuming inside this epoch
            loss_sum = torch.full((), run.epoch_loss_sum if done else 0.0, device=device)
            window_start, window_images = time.perf_counter(), 0
            for images, _ in itertools.islice(loader.epoch(epoch), done, None):
                try:
                    with torch.no_grad(), blame("views", names):
                        views = components.views(images)
                    if run.step == 0 and main:
                        _save_view_grid(views, out_dir, writer)
                    loss, metrics, target_metrics = train_step(
                        components,
                        optimizer,
                        views,
                        run.step,
                        total_steps,
                        autocast,
                        names,
                        wrapped,
                    )
                except ComponentFailure as exc:
                    raise ComponentFailure(
                        f"{exc} at step {run.step + 1} (epoch {epoch + 1}). The last checkpoint, "
                        f"{str(out_dir / FILENAME)!r} at epoch {run.epoch}, is intact: fix the "
                        f"plugin and continue with `sslplug run --resume {out_dir}`"
                    ) from exc.__cause__
                scheduler.step()
                loss_sum += loss
                run.step += 1
                window_images += images.shape[0]
                progress.update(1)
                if distributed.any_rank(stop.requested is not None):
                    run.epoch_loss_sum = loss_sum.item()
                    state = run.state()
                    if main:
                        save_checkpoint(state, out_dir / FILENAME)
                    signal_name = stop.requested or "SIGTERM"
                    _print(
                        f"{signal_name}: stopped after step {run.step} (epoch {epoch + 1}, "
                        f"step {run.step - epoch * steps_per_epoch} of {steps_per_epoch}); "
                        f"checkpoint written to {str(out_dir / FILENAME)!r}. Continue with: "
                        f"sslplug run --resume {out_dir}"
                    )
                    raise KeyboardInterrupt
                if run.step % config.train.log_every == 0:
                    last_loss = distributed.mean_over_ranks(loss.item())
                    if not math.isfinite(last_loss):
                        raise NonFiniteLossError(
                            f"the loss is {last_loss} at step {run.step} (epoch {epoch + 1}); the "
                            f"last good checkpoint is {str(out_dir / FILENAME)!r} at epoch "
                            f"{run.epoch}. "
                            f"Lower optim.lr or check the components' settings"
                        )
                    elapsed = time.perf_counter() - window_start
                    scalars = {
                        "loss": last_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "images_per_second": window_images / max(elapsed, 1e-9),
                        **{k: float(v) for k, v in metrics.items()},
                        **target_metrics,
                    }
                    for key, value in scalars.items():
                        writer.add_scalar(f"train/{key}", value, run.step)
                    if main:
                        registry.step_end(context, run.step, scalars)
                    progress.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch + 1)
                    window_start, window_images = time.perf_counter(), 0

            epoch_seconds = time.perf_counter() - epoch_start
            run.epoch = epoch + 1
            mean_loss = distributed.mean_over_ranks((loss_sum / steps_per_epoch).item())
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"the mean loss of epoch {run.epoch} is {mean_loss}; the last good checkpoint "
                    f"is {str(out_dir / FILENAME)!r} at epoch {run.epoch - 1}. Lower optim.lr"
                )
            epoch_metrics = {
                "epoch": run.epoch,
                "loss": mean_loss,
                "images_per_second": (steps_per_epoch - done)
                * config.train.batch_size
                / epoch_seconds,
                "data_wait_share": loader.wait_seconds / epoch_seconds,
            }
            every = config.eval.every
            if main and (run.epoch == config.train.epochs or (every and run.epoch % every == 0)):
                top1 = _evaluate(run, device)
                if top1 is not None:
                    epoch_metrics["knn_top1"] = top1
                    writer.add_scalar("knn/top1", top1, run.step)
            for key in ("loss", "images_per_second", "data_wait_share"):
                writer.add_scalar(f"epoch/{key}", epoch_metrics[key], run.epoch)
            run.history.append(epoch_metrics)
            run.epoch_loss_sum = 0.0
            if world > 1:
                _check_ranks_agree(components, run.epoch)
            state = run.state()  # on every rank: it gathers each rank's random-number state
            if main:
                save_checkpoint(state, out_dir / FILENAME)
                registry.epoch_end(context, run.epoch, epoch_metrics)
            knn_text = (
                f", kNN top-1 {epoch_metrics['knn_top1']:.2f}%"
                if "knn_top1" in epoch_metrics
                else ""
            )
            progress.write(
                f"epoch {run.epoch}/{config.train.epochs}: loss {mean_loss:.4f}, "
                f"{epoch_metrics['images_per_second']:.0f} img/s, "
                f"data wait {100 * epoch_metrics['data_wait_share']:.1f}%{knn_text}"
            )
    finally:
        stop.__exit__()
        progress.close()
        writer.flush()

    knn_points = [h for h in run.history if "knn_top1" in h]
    summary = {
        "run_dir": str(out_dir),
        "data": data.name,
        "backbone": config.model.backbone,
        "components": dict(context.components),
        "epochs": run.epoch,
        "steps": run.step,
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "knn_top1": knn_points[-1]["knn_top1"] if knn_points else None,
        "knn_top1_random_init": run.knn_baseline,
        "knn_history": [{"epoch": h["epoch"], "top1": h["knn_top1"]} for h in knn_points],
        "images_per_second_median": _median(run.history, "images_per_second"),
        "data_wait_share_median": _median(run.history, "data_wait_share"),
        "wall_seconds_this_session": time.perf_counter() - run_start,
        "skipped_images": data.skipped,
    }
    if not main:
        return summary
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_embeddings(run, device, writer)
    for key in ("knn_top1", "knn_top1_random_init"):
        if summary[key] is not None:
            writer.add_scalar(f"summary/{key}", summary[key], run.step)
    writer.close()
    registry.run_end(context, summary)
    return summary


def _median(history: list[dict[str, float]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return statistics.median(values) if values else None


def _print(text: str) -> None:
    if distributed.is_main():
        tqdm.write(text, file=sys.stderr)
