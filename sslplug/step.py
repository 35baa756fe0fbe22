"""One optimisation step, and the checks on what components return during it.

``train_step`` is the step the loop runs (and ``sslplug bench`` times): forward, loss,
backward, the optimiser step with the components' rules, and the target update. What a
component raises or returns against the contract becomes a ``ComponentFailure`` that names its
plugin (``blame``, ``expect``, ``scalars``), so a failing plugin is told apart from the core.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from sslplug.components import LossResult, Outputs, Views
from sslplug.errors import PluginError, SslplugError
from sslplug.optim import Optimization
from sslplug.plugins import Components

__all__ = ["ComponentFailure", "blame", "expect", "scalars", "train_step"]


class ComponentFailure(PluginError):
    """A component raised during training."""


def _from_torch_compile(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.compile``'s; its module is only imported when something
    compiles (importing it takes seconds), and an exception of it cannot exist before."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(exc, dynamo.TorchDynamoException)


@contextlib.contextmanager
def blame(component: str, names: Mapping[str, str]) -> Iterator[None]:
    """Turn an exception raised inside ``component`` into one that names its plugin; a failure
    of ``torch.compile`` is not the plugin's and passes (``compile_failures`` says what it is)."""
    try:
        yield
    except (SslplugError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if component not in names or _from_torch_compile(exc):
            raise
        raise ComponentFailure(
            f"plugin {names[component]!r} raised in its {component}: {exc!r}"
        ) from exc


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
    the components' rules), the components' ``update_from_step`` and the target update.
    Returns the detached loss, the loss's metrics and the target's metrics; nothing is read
    back to the host. ``names`` (component -> plugin)
    lets an exception raised inside a component name the plugin that raised it; ``wrapped``
    holds the DDP wrappers of the encoder and the loss, which the forward pass goes through when
    training on many ranks."""
    encoder, loss_fn, target_update = components.encoder, components.loss, components.target_update
    names, wrapped = names or {}, wrapped or {}
    with autocast:
        with blame("encoder", names):
            outputs = wrapped.get("encoder", encoder)(views)
        expect(isinstance(outputs, Outputs), "encoder", names, "sslplug.Outputs", outputs)
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
    _update_from_step(components, outputs, views, target, names)
    target_metrics: Any = {}
    if target_update is not None:
        with blame("target_update", names):
            target_metrics = target_update.step(encoder, *optimization.position(step))
        expect(
            isinstance(target_metrics, dict | None),
            "target_update",
            names,
            "a dict of scalar metrics (or None) from step()",
            target_metrics,
        )
    return loss.detach(), metrics, target_metrics or {}


def _update_from_step(
    components: Components, outputs: Outputs, views: Views, target: Any, names: Mapping[str, str]
) -> None:
    """Let the loss, then the target update, change their state from this step's outputs: each
    that defines ``update_from_step(outputs, views, target)`` has it called after the optimiser
    step, without gradient (DINO's running centre of the teacher's outputs)."""
    for component in ("loss", "target_update"):
        update = getattr(getattr(components, component), "update_from_step", None)
        if update is not None:
            with torch.no_grad(), blame(component, names):
                update(outputs, views, target)


def expect(ok: bool, component: str, names: Mapping[str, str], what: str, got: Any) -> None:
    """Unless ``ok``, say that ``component``'s plugin returned ``got`` where the contract
    expects ``what``."""
    if not ok:
        raise ComponentFailure(
            f"plugin {names.get(component, '?')!r}'s {component.replace('_', ' ')} returned "
            f"{type(got).__name__}; the contract expects {what}"
        )


def scalars(metrics: Mapping[str, Any], component: str, names: Mapping[str, str]) -> dict:
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
