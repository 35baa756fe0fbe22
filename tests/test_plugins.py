"""The registry: loading, failure isolation, resolution of components, compatibility checks."""

from __future__ import annotations

import math
import types
from typing import ClassVar

import attrs
import pytest
import torch
from torch import nn

import sslplug
from sslplug.config import RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError, PluginError
from sslplug.nn import build_backbone
from sslplug.plugins import PluginRegistry

from .conftest import FAST
from .conftest import fake_distribution as _distribution


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


WITH_TARGET = {"byol", "moco_v2", "moco_v3", "dino", "ijepa", "distill", "ibot", "dinov2"}
WITHOUT_TARGET = {
    "simclr", "barlow_twins", "rotnet", "jigsaw", "cpc", "swav", "vicreg", "nnclr", "simsiam",
    "mae",
}  # fmt: skip


def test_every_built_in_method_is_listed_with_its_components(registry):
    everything = ("augmentation", "views", "encoder", "loss", "target_update")
    info = {i.name: i for i in registry.info() if i.distribution == "sslplug"}
    assert set(info) == WITH_TARGET | WITHOUT_TARGET
    for name, entry in info.items():
        expected = everything if name in WITH_TARGET else everything[:-1]
        assert entry.components == expected, name
        assert entry.has_settings, name


def test_plugin_that_fails_to_import_is_reported_and_left_out(tmp_path, monkeypatch):
    broken = {"broken": "import missing_dependency  # not installed\n"}
    monkeypatch.syspath_prepend(_distribution(tmp_path, "broken-dist", broken))
    registry = PluginRegistry()
    registry.load_entry_points()
    assert "byol" in registry.names()
    assert "broken" not in registry.names()
    (failure,) = registry.failures
    assert failure.name == "broken" and failure.distribution == "broken-dist"
    assert "missing_dependency" in str(failure) and "broken-dist" in str(failure)


def test_strict_loading_turns_a_failure_into_an_error(tmp_path, monkeypatch):
    broken = {"broken": "raise RuntimeError('kaput')\n"}
    monkeypatch.syspath_prepend(_distribution(tmp_path, "thirdparty", broken))
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


@attrs.define
class WeightSettings:
    weight: float = 1.0


def test_hook_settings_class_is_filled_from_the_config_and_given_to_the_hooks(registry):
    received = []

    @sslplug.hookimpl
    def sslplug_settings():
        return WeightSettings

    @sslplug.hookimpl
    def sslplug_loss(settings):
        received.append(settings)
        return MeanLoss()

    plugin = _module("weighted", sslplug_settings=sslplug_settings, sslplug_loss=sslplug_loss)
    assert registry.register(plugin, "weighted")
    assert registry.settings_classes()["weighted"] is WeightSettings
    _build(registry, "components.loss=weighted", "weighted.weight=0.5")
    assert received == [WeightSettings(weight=0.5)]


def test_hook_settings_must_return_an_attrs_class():
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
        PluginError,
        match=r"unknown plugin 'nope' \(components.loss = 'nope'\)\. Installed plugins: .*byol",
    ):
        _build(registry, "components.loss=nope")


def test_hook_target_update_none_gives_a_run_without_target(registry):
    components = _build(registry, "components.target_update=none")
    assert components.target_update is None
    assert components.sources["target_update"] == "none"


def test_hook_augmentation_of_one_plugin_feeds_the_views_of_another(registry):
    sizes = []

    @sslplug.hookimpl
    def sslplug_augmentation(run):
        sizes.append(run.image_size)
        return sslplug.simclr_recipe(run.image_size, views=2)

    registry.register(_module("augs", sslplug_augmentation=sslplug_augmentation), "augs")
    components = _build(registry, "components.augmentation=augs")
    assert sizes == [16]
    assert components.sources["augmentation"] == "augs" and components.sources["views"] == "byol"
    views = components.views(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    assert len(views.images) == 2 and views.images[0].shape == (4, 3, 16, 16)


class OneView(sslplug.ViewGenerator):
    def forward(self, batch):
        return sslplug.Views(images=(sslplug.normalize(sslplug.to_float(batch)),))


def _one_view_plugin():
    @sslplug.hookimpl
    def sslplug_views():
        return OneView()

    return _module("oneview", sslplug_views=sslplug_views)


def test_hook_views_of_an_incompatible_mix_fail_before_training_naming_both(registry):
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


def test_hook_encoder_returning_the_wrong_type_is_named(registry):
    @sslplug.hookimpl
    def sslplug_encoder():
        return nn.Linear(2, 2)

    registry.register(_module("wrong", sslplug_encoder=sslplug_encoder), "wrong")
    with pytest.raises(PluginError, match=r"plugin 'wrong' returned Linear from sslplug_encoder"):
        _build(registry, "components.encoder=wrong")


def test_hook_loss_that_raises_names_plugin_and_component(registry):
    @sslplug.hookimpl
    def sslplug_loss():
        raise ValueError("bad temperature")

    registry.register(_module("raiser", sslplug_loss=sslplug_loss), "raiser")
    with pytest.raises(
        PluginError, match=r"plugin 'raiser' failed to build its loss: .*bad temperature"
    ):
        _build(registry, "components.loss=raiser")


class MeanLoss(nn.Module):
    requires: ClassVar[frozenset[str]] = frozenset({"projection"})

    def forward(self, outputs, views, target):
        loss = sum(z.pow(2).mean() for z in outputs.projections)
        return loss, {}


def test_hook_loss_from_another_plugin_mixes_in(registry):
    @sslplug.hookimpl
    def sslplug_loss():
        return MeanLoss()

    registry.register(_module("meanloss", sslplug_loss=sslplug_loss), "meanloss")
    components = _build(registry, "components.loss=meanloss")
    assert components.sources["loss"] == "meanloss"
    assert components.sources["encoder"] == "byol"


@pytest.fixture(scope="module")
def lifecycle(shapes_folder, tmp_path_factory) -> tuple[list[tuple[str, dict]], dict]:
    """The lifecycle hook calls received, in order, by a plugin that provides no component of
    the run (lifecycle hooks reach every plugin) during a real run of two epochs of two steps,
    and the summary the run returns."""
    calls: list[tuple[str, dict]] = []

    @sslplug.hookimpl
    def sslplug_run_start(run):
        calls.append(("run_start", {"components": dict(run.components)}))

    @sslplug.hookimpl
    def sslplug_step_end(run, step, metrics):
        calls.append(("step_end", {"step": step, "metrics": dict(metrics)}))

    @sslplug.hookimpl
    def sslplug_epoch_end(run, epoch, metrics):
        calls.append(("epoch_end", {"epoch": epoch, "metrics": dict(metrics)}))

    @sslplug.hookimpl
    def sslplug_run_end(run, summary):
        calls.append(("run_end", {"summary": summary}))

    registry = PluginRegistry()
    registry.load_entry_points()
    listener = _module(
        "listener",
        sslplug_run_start=sslplug_run_start,
        sslplug_step_end=sslplug_step_end,
        sslplug_epoch_end=sslplug_epoch_end,
        sslplug_run_end=sslplug_run_end,
    )
    assert registry.register(listener, "listener")
    config = load_config(
        assignments=[
            *FAST,
            f"data.name={shapes_folder}",  # 80 images: two steps of 32 an epoch
            "train.epochs=2",
            "knn.baseline=false",
            "health.baseline=false",
            "knn.every=0",
            "health.every=0",
            "tensorboard.embedding_samples=0",
            f"train.out={tmp_path_factory.mktemp('lifecycle') / 'run'}",
        ],
        plugin_settings=registry.settings_classes(),
    )
    summary = train(config, registry)
    return calls, summary


def test_hook_run_start_comes_first_with_the_chosen_components(lifecycle):
    calls, summary = lifecycle
    (starts,) = [index for index, (hook, _) in enumerate(calls) if hook == "run_start"]
    assert starts == 0
    assert calls[0][1]["components"] == summary["components"]


def test_hook_step_end_follows_every_step_with_its_metrics(lifecycle):
    calls, summary = lifecycle
    steps = [args for hook, args in calls if hook == "step_end"]
    assert [args["step"] for args in steps] == [1, 2, 3, 4] and summary["steps"] == 4
    assert all(math.isfinite(args["metrics"]["loss"]) for args in steps)


def test_hook_epoch_end_follows_the_last_step_of_each_epoch(lifecycle):
    calls, _ = lifecycle
    between = [(hook, args.get("step", args.get("epoch"))) for hook, args in calls[1:-1]]
    assert between == [
        ("step_end", 1), ("step_end", 2), ("epoch_end", 1),
        ("step_end", 3), ("step_end", 4), ("epoch_end", 2),
    ]  # fmt: skip
    epochs = [args for hook, args in calls if hook == "epoch_end"]
    assert all(math.isfinite(args["metrics"]["loss"]) for args in epochs)


def test_hook_run_end_comes_last_with_the_summary(lifecycle):
    calls, summary = lifecycle
    hook, args = calls[-1]
    assert hook == "run_end" and [h for h, _ in calls].count("run_end") == 1
    assert args["summary"]["epochs"] == 2 and args["summary"]["steps"] == summary["steps"]


def test_a_config_error_while_building_keeps_its_type_and_reads_plainly(registry):
    @sslplug.hookimpl
    def sslplug_loss():
        raise ConfigError("the teacher 'nosuch:thing' is neither published nor a file")

    registry.register(_module("picky", sslplug_loss=sslplug_loss), "picky")
    with pytest.raises(ConfigError) as caught:
        _build(registry, "components.loss=picky")
    assert str(caught.value) == (
        "plugin 'picky', building its loss: the teacher 'nosuch:thing' is neither published "
        "nor a file"
    )
