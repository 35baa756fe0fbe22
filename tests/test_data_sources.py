"""A plugin adds a data set that ``--data NAME`` chooses, through ``sslplug_data_sources``."""

from __future__ import annotations

import types

import torch

import sslplug
from sslplug.config import load_config
from sslplug.data import DataSet, Split, load_data
from sslplug.data.sources import BUILTIN, SOURCES
from sslplug.engine import train
from sslplug.plugins import PluginRegistry

from .conftest import FAST


def _noise(settings, seed: int) -> DataSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(64) % 4
    train_split = Split(labels=labels[:48], images=images[:48])
    test_split = Split(labels=labels[48:], images=images[48:])
    return DataSet(settings.name, train_split, test_split, 16, ("a", "b", "c", "d"))


def _plugin(name: str, source: str) -> types.ModuleType:
    @sslplug.hookimpl
    def sslplug_data_sources(register):
        register(source, _noise, "random pixels, for tests")

    module = types.ModuleType(name)
    module.sslplug_data_sources = sslplug_data_sources  # type: ignore[attr-defined]
    return module


def test_hook_data_sources_adds_a_data_set_that_a_run_trains_on(tmp_path):
    registry = PluginRegistry()
    registry.load_entry_points()
    assert registry.register(_plugin("noise_data", "noise16"), "noise_data"), registry.failures
    assert SOURCES["noise16"].description == "random pixels, for tests"
    # a second registry of the same process loading the same plugin is no clash
    again = PluginRegistry()
    assert again.register(_plugin("noise_data", "noise16"), "noise_data"), again.failures
    config = load_config(
        None,
        [*FAST, "data.name=noise16", "train.epochs=1", f"train.out={tmp_path / 'run'}"],
        registry.settings_classes(),
    )
    data = load_data(config.data, seed=0)
    assert (len(data.train), data.image_size, data.num_classes) == (48, 16, 4)
    summary = train(config, registry)
    assert summary["epochs"] == 1


def test_a_plugin_cannot_take_a_built_in_data_set_name():
    registry = PluginRegistry()
    assert not registry.register(_plugin("thief", "cifar10"), "thief")
    (failure,) = registry.failures
    assert "cifar10" in failure.error and "taken" in failure.error
    assert "cifar10" in BUILTIN and SOURCES["cifar10"].builder is not _noise
