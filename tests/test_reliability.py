"""Faults during training: a stop signal mid-epoch, a plugin that raises, bad settings."""

from __future__ import annotations

import json
import os
import signal
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sslplug
from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.config import load_config, parse_assignment
from sslplug.engine import ComponentFailure, train
from sslplug.errors import SslplugError
from sslplug.plugins import PluginRegistry

from .conftest import FAST


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


class TerminatedAtStep2:
    """A lifecycle plugin that sends this process SIGTERM after the second step."""

    @sslplug.hookimpl
    def sslplug_step_end(self, step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow  # a three-epoch run, stopped and resumed, and another
def test_sigterm_mid_epoch_saves_and_resume_is_exact(fast_args, tmp_path, with_plugin, capsys):
    args = _with(fast_args, "--epochs", "3")
    assert main(_with(args, "--out", str(tmp_path / "full"))) == 0
    with with_plugin(TerminatedAtStep2(), "terminator"):
        assert main(_with(args, "--out", str(tmp_path / "half"))) == 130
    err = capsys.readouterr().err
    assert "SIGTERM: stopped after step 3 (epoch 2, step 1 of 2)" in err
    assert f"sslplug run --resume {tmp_path / 'half'}" in err
    state = load_checkpoint(tmp_path / "half")
    assert (state["epoch"], state["step"]) == (1, 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back

    assert main(["run", "--resume", str(tmp_path / "half")]) == 0
    resumed, straight = load_checkpoint(tmp_path / "half"), load_checkpoint(tmp_path / "full")
    for key in straight["encoder"]:
        torch.testing.assert_close(resumed["encoder"][key], straight["encoder"][key], msg=key)
    a = json.loads((tmp_path / "half" / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)


def _faulty_plugin(component: str) -> types.ModuleType:
    """A plugin whose ``component`` is BYOL's, raising ``RuntimeError('boom')`` on its third
    call."""
    from sslplug_methods import byol as sslplug_byol

    calls = {"n": 0}

    def faulty(module: torch.nn.Module) -> torch.nn.Module:
        real = module.forward

        def forward(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        module.forward = forward
        return module

    settings = sslplug_byol.BYOLSettings(projector_hidden_dim=64, predictor_hidden_dim=64)
    plugin = types.ModuleType("faulty")

    @sslplug.hookimpl
    def sslplug_views(augmentations):
        return faulty(sslplug.MultiViewGenerator(augmentations))  # the default views

    @sslplug.hookimpl
    def sslplug_encoder(backbone, feature_dim):
        return faulty(sslplug_byol.BYOLEncoder(backbone, feature_dim, settings))

    @sslplug.hookimpl
    def sslplug_loss():
        return faulty(sslplug_byol.BYOLLoss())

    @sslplug.hookimpl
    def sslplug_target_update(encoder):
        return faulty(sslplug_byol.BYOLTarget(encoder, 0.99))

    hook = locals()[f"sslplug_{component}"]
    setattr(plugin, hook.__name__, hook)
    return plugin


@pytest.mark.parametrize("component", ["loss", "encoder", "views", "target_update"])
def test_a_component_raising_mid_run_names_its_plugin_and_the_checkpoint_stays(
    registry, shapes_folder, tmp_path, component
):
    assert registry.register(_faulty_plugin(component), "faulty")
    config = load_config(
        assignments=[
            *FAST,
            f"data.name={shapes_folder}",
            "train.epochs=3",
            f"train.out={tmp_path}",
            f"components.{component}=faulty",
            # they draw views, or run the encoder, outside the training steps
            'train.disable=["view_grid", "health"]',
        ],
        plugin_settings=registry.settings_classes(),
    )
    with pytest.raises(ComponentFailure) as info:
        train(config, registry)
    message = str(info.value)
    assert f"plugin 'faulty' raised in its {component}: RuntimeError('boom')" in message
    assert "at step 3 (epoch 2)" in message and "is intact" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert load_checkpoint(tmp_path)["epoch"] == 1


_KEYS = st.sampled_from(
    ["train.epochs", "train.batch_size", "optim.lr", "data.name", "byol.tau_base", "x.y", "train"]
)


@settings(max_examples=150, deadline=None)
@given(key=_KEYS, value=st.text(max_size=12))
def test_any_assignment_parses_or_is_our_error(key, value):
    registry = _registry()
    try:
        parse_assignment(f"{key}={value}")
        load_config(None, [f"{key}={value}"], registry.settings_classes())
    except SslplugError as exc:
        assert str(exc)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=30))
def test_any_text_as_an_assignment_parses_or_is_our_error(text):
    try:
        load_config(None, [text], _registry().settings_classes())
    except SslplugError as exc:
        assert str(exc)


@settings(max_examples=60, deadline=None)
@given(
    table=st.dictionaries(
        st.sampled_from(["train", "optim", "data", "byol", "eval", "nope"]),
        st.dictionaries(
            st.sampled_from(["epochs", "lr", "name", "tau_base", "knn_k", "bogus"]),
            st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.booleans()),
            max_size=3,
        ),
        max_size=3,
    )
)
def test_any_settings_table_builds_or_is_our_error(table):
    try:
        load_config(None, (), _registry().settings_classes(), base=table)
    except SslplugError as exc:
        assert str(exc)


_REGISTRY: list[PluginRegistry] = []


def _registry() -> PluginRegistry:
    if not _REGISTRY:
        registry = PluginRegistry()
        registry.load_entry_points()
        _REGISTRY.append(registry)
    return _REGISTRY[0]
