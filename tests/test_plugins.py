"""The registry: loading, failure isolation, resolution of components, compatibility checks."""

from __future__ import annotations

import importlib.metadata
import types
from typing import ClassVar

import attrs
import pytest
import torch
from torch import nn

import sslplug
from sslplug.config import RunContext, load_config
from sslplug.errors import ComponentMismatchError, PluginError
from sslplug.nn import build_backbone
from sslplug.plugins import PluginRegistry


class FakeDist:
    def __init__(self, name: str, version: str = "1.0") -> None:
        self.name, self.version = name, version


class FakeEntryPoint:
    def __init__(self, name: str, value: str, loader, dist: str = "thirdparty") -> None:
        self.name, self.value, self._loader, self.dist = name, value, loader, FakeDist(dist)

    def load(self):
        return self._loader()


def _with_entry_points(monkeypatch, extra):
    real = importlib.metadata.entry_points

    def fake(group=None, **kwargs):
        eps = list(real(group=group, **kwargs)) if group else real(**kwargs)
        return eps + extra if group == "sslplug" else eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def _module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for fname, fn in functions.items():
        setattr(module, fname, fn)
    return module


def test_builtin_byol_is_loaded_from_the_entry_point_group(registry):
    assert "byol" in registry.names()
    (info,) = [i for i in registry.info() if i.name == "byol"]
    assert info.distribution == "sslplug"
    assert info.components == ("augmentation", "views", "encoder", "loss", "target_update")
    assert info.has_settings
    assert registry.failures == []


def test_plugin_that_fails_to_import_is_reported_and_left_out(monkeypatch):
    def boom():
        raise ImportError("no module named 'missing_dependency'")

    _with_entry_points(
        monkeypatch, [FakeEntryPoint("broken", "broken_mod", boom, dist="broken-dist")]
    )
    registry = PluginRegistry()
    registry.load_entry_points()
    assert "byol" in registry.names()
    assert "broken" not in registry.names()
    (failure,) = registry.failures
    assert failure.name == "broken" and failure.distribution == "broken-dist"
    assert "missing_dependency" in str(failure) and "broken-dist" in str(failure)


def test_strict_loading_turns_a_failure_into_an_error(monkeypatch):
    def boom():
        raise RuntimeError("kaput")

    _with_entry_points(monkeypatch, [FakeEntryPoint("broken", "broken_mod", boom)])
    with pytest.raises(PluginError, match=r"broken.*kaput"):
        PluginRegistry(strict=True).load_entry_points()


def test_misspelled_hook_is_caught_by_check_pending():
    @sslplug.hookimpl
    def sslplug_los():
        return nn.Identity()

    registry = PluginRegistry()
    assert not registry.register(_module("typo", sslplug_los=sslplug_los), "typo")
    assert "typo" not in registry.names()
    assert "sslplug_los" in registry.failures[0].error


def test_settings_hook_must_return_an_attrs_class():
    @sslplug.hookimpl
    def sslplug_settings():
        return dict

    registry = PluginRegistry()
    assert not registry.register(_module("bad", sslplug_settings=sslplug_settings), "bad")
    assert "attrs class" in registry.failures[0].error


def test_two_plugins_cannot_share_a_name(registry):
    assert not registry.register(_module("again"), "byol", distribution="other-dist")
    assert "already registered" in registry.failures[-1].error


def _context(config) -> RunContext:
    return RunContext(config=config, image_size=16, num_classes=10, total_steps=10)


def _build(registry, *sets):
    config = load_config(
        assignments=["byol.projector_hidden_dim=16", "byol.predictor_hidden_dim=16", *sets],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 16)
    return registry.build(config, _context(config), backbone, dim)


def test_build_resolves_every_component_from_the_chosen_plugin(registry):
    components = _build(registry)
    assert components.sources == dict.fromkeys(
        ("augmentation", "views", "encoder", "loss", "target_update"), "byol"
    )
    views = components.views(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    assert len(views.images) == 2 and views.images[0].shape == (4, 3, 16, 16)


def test_unknown_plugin_lists_the_installed_ones(registry):
    with pytest.raises(
        PluginError, match=r"unknown plugin 'nope' for the loss.*Installed plugins: .*byol"
    ):
        _build(registry, "components.loss=nope")


def test_target_update_none_gives_a_run_without_target(registry):
    components = _build(registry, "components.target_update=none")
    assert components.target_update is None
    assert components.sources["target_update"] == "none"


@attrs.define
class OneViewSettings:
    pass


class OneView(sslplug.ViewGenerator):
    def forward(self, batch):
        return sslplug.Views(images=(sslplug.normalize(sslplug.to_float(batch)),))


def _one_view_plugin():
    @sslplug.hookimpl
    def sslplug_views():
        return OneView()

    return _module("oneview", sslplug_views=sslplug_views)


def test_incompatible_mix_fails_before_training_naming_both_components(registry):
    registry.register(_one_view_plugin(), "oneview")
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "components.views=oneview")
    message = str(info.value)
    assert "loss from plugin 'byol'" in message
    assert "two_views" in message and "'oneview'" in message


def test_plugin_without_the_component_asked_for(registry):
    registry.register(_one_view_plugin(), "oneview")
    with pytest.raises(
        PluginError,
        match=r"plugin 'oneview' provides no loss\. Plugins that do: barlow_twins, byol, cpc, ",
    ):
        _build(registry, "components.loss=oneview")


def test_hook_returning_the_wrong_type_is_named(registry):
    @sslplug.hookimpl
    def sslplug_encoder():
        return nn.Linear(2, 2)

    registry.register(_module("wrong", sslplug_encoder=sslplug_encoder), "wrong")
    with pytest.raises(PluginError, match=r"plugin 'wrong' returned Linear from sslplug_encoder"):
        _build(registry, "components.encoder=wrong")


def test_hook_that_raises_names_plugin_and_component(registry):
    @sslplug.hookimpl
    def sslplug_loss():
        raise ValueError("bad temperature")

    registry.register(_module("raiser", sslplug_loss=sslplug_loss), "raiser")
    with pytest.raises(
        PluginError, match=r"plugin 'raiser' failed to build its loss: .*bad temperature"
    ):
        _build(registry, "components.loss=raiser")


def test_a_loss_from_another_plugin_mixes_in(registry):
    class MeanLoss(nn.Module):
        requires: ClassVar[frozenset[str]] = frozenset({"projection"})

        def forward(self, outputs, views, target):
            loss = sum(z.pow(2).mean() for z in outputs.projections)
            return loss, {}

    @sslplug.hookimpl
    def sslplug_loss():
        return MeanLoss()

    registry.register(_module("meanloss", sslplug_loss=sslplug_loss), "meanloss")
    components = _build(registry, "components.loss=meanloss")
    assert components.sources["loss"] == "meanloss"
    assert components.sources["encoder"] == "byol"


def test_lifecycle_hooks_reach_every_plugin(registry):
    seen = []

    @sslplug.hookimpl
    def sslplug_epoch_end(epoch, metrics):
        seen.append((epoch, metrics["loss"]))

    registry.register(_module("listener", sslplug_epoch_end=sslplug_epoch_end), "listener")
    registry.epoch_end(_context(load_config()), 3, {"loss": 1.5})
    assert seen == [(3, 1.5)]
