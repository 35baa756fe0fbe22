"""What many tests do to a run, written once: record the hooks a run calls, stop it after an
epoch, train it (threads pinned so that runs compare bit for bit), and compare checkpoints."""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import sslplug
from sslplug.checkpoint import load_checkpoint
from sslplug.config import RunConfig, load_config
from sslplug.engine import train
from sslplug.plugins import PluginRegistry

# checkpoint entries holding the state of the run's components and optimisation
STATE = ("views", "encoder", "loss", "target_update", "optimizer")


class StopAfterEpoch:
    """A lifecycle plugin that interrupts the run (as Ctrl-C would) once ``epoch`` is saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @sslplug.hookimpl
    def sslplug_epoch_end(self, epoch: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


class StepRecorder:
    """A lifecycle plugin that keeps the metrics of every logged step, in order."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    @sslplug.hookimpl
    def sslplug_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append({"step": step, **metrics})


def hook_plugin(name: str, **hooks: Any) -> types.ModuleType:
    """A plugin module named ``name`` with the given hook functions (marked as hookimpls)."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, sslplug.hookimpl(function))
    return module


def registry_with(*plugins: object) -> PluginRegistry:
    """The installed plugins, and ``plugins`` registered beside them (as ``extra0``, ...)."""
    registry = PluginRegistry()
    registry.load_entry_points()
    for index, plugin in enumerate(plugins):
        assert registry.register(plugin, f"extra{index}"), registry.failures
    return registry


def config_of(registry: PluginRegistry, assignments: Sequence[str]) -> RunConfig:
    return load_config(None, list(assignments), registry.settings_classes())


def train_pinned(
    out: Path,
    assignments: Sequence[str],
    *plugins: object,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Train with ``assignments`` into ``out`` on one thread, so that two runs reduce in the same
    order and compare bit for bit; ``plugins`` take part beside the installed ones."""
    registry = registry_with(*plugins)
    config = config_of(registry, [*assignments, f"train.out={out}"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, registry, resume=resume)
    finally:
        torch.set_num_threads(before)


def run_one_epoch(data: Path, out: Path, settings: Sequence[str], *args: str) -> Path:
    """``sslplug run --data DATA --epochs 1 --out OUT ARGS`` with ``--set`` of each of
    ``settings``, through the command line; returns ``out``."""
    from sslplug.cli import main

    command = ["run", "--data", str(data), "--epochs", "1", "--out", str(out), *args]
    for item in settings:
        command += ["--set", item]
    assert main(command) == 0
    return out


def stop_and_resume(
    out: Path, assignments: Sequence[str], stop_after: int, *plugins: object
) -> dict[str, Any]:
    """Train into ``out``, interrupted once epoch ``stop_after`` is saved, then resume to the
    end; returns the resumed run's summary."""
    try:
        train_pinned(out, assignments, StopAfterEpoch(stop_after), *plugins)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError(f"the run did not stop after epoch {stop_after}")
    assert load_checkpoint(out)["epoch"] == stop_after
    return train_pinned(out, assignments, *plugins, resume=out)


def assert_same_state(a: dict[str, Any], b: dict[str, Any], where: str = "") -> None:
    """Two checkpoints (or nested parts of them) hold equal tensors, bit for bit."""
    assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
    for key, value in a.items():
        other = b[key]
        name = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict):
            assert_same_state(value, other, name)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        elif isinstance(value, list | tuple) and value and isinstance(value[0], dict):
            for index, (x, y) in enumerate(zip(value, other, strict=True)):
                assert_same_state(x, y, f"{name}[{index}]")
        else:
            assert value == other, name


def assert_same_checkpoints(run_a: Path, run_b: Path, parts: Sequence[str] = STATE) -> None:
    """The checkpoints of two runs hold the same step and the same state of ``parts``."""
    a, b = load_checkpoint(run_a), load_checkpoint(run_b)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for part in parts:
        if a.get(part) is None and b.get(part) is None:
            continue
        assert_same_state(a[part], b[part], part)


def assert_public_api_only(path: Path, allowed_imports: set[str]) -> None:
    """The module at ``path`` imports nothing but ``allowed_imports`` and ``sslplug``, names
    only what ``sslplug.__all__`` exports, and reads no private attribute but its own."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        assert set(modules) <= allowed_imports | {"sslplug"}, (
            f"line {node.lineno} imports {modules}"
        )
    attributes = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    used = {a.attr for a in attributes if isinstance(a.value, ast.Name) and a.value.id == "sslplug"}
    assert used <= set(sslplug.__all__), sorted(used - set(sslplug.__all__))
    private = sorted(
        {
            a.attr
            for a in attributes
            if a.attr.startswith("_")
            and not a.attr.endswith("__")
            and not (isinstance(a.value, ast.Name) and a.value.id == "self")
        }
    )
    assert not private, f"reaches into private names: {private}"
