"""Mixing components across plugins: each advertised mix trains on the default data, and a mix
that cannot work fails before the first step."""

from __future__ import annotations

import types

import pytest

import sslplug
from sslplug.config import load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError
from sslplug.plugins import PluginRegistry

NARROW = [
    "byol.projector_hidden_dim=128",
    "byol.predictor_hidden_dim=128",
    "byol.projection_dim=64",
    "barlow_twins.projector_dim=128",
]


def _listening(registry: PluginRegistry) -> list[float]:
    losses: list[float] = []

    @sslplug.hookimpl
    def sslplug_step_end(metrics):
        losses.append(metrics["loss"])

    plugin = types.ModuleType("loss_listener")
    plugin.sslplug_step_end = sslplug_step_end
    registry.register(plugin, "loss_listener")
    return losses


@pytest.mark.slow  # four runs of 20 steps on the default data
@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (
            ["components.plugin=byol", "components.augmentation=simclr"],
            {"augmentation": "simclr", "loss": "byol", "target_update": "byol"},
        ),
        (
            ["components.plugin=simclr", "components.loss=barlow_twins"],
            {"encoder": "simclr", "loss": "barlow_twins", "target_update": "none"},
        ),
        (
            ["components.plugin=barlow_twins", "components.loss=byol"],
            {"encoder": "barlow_twins", "loss": "byol", "target_update": "none"},
        ),
        (
            ["components.plugin=byol", "components.target_update=none"],
            {"encoder": "byol", "loss": "byol", "target_update": "none"},
        ),
    ],
    ids=[
        "byol+simclr-augmentation",
        "simclr+barlow-twins-loss",
        "barlow-twins+byol-loss",
        "simsiam",
    ],
)
def test_mix_trains_on_the_default_data(registry, tmp_path, choice, expected):
    losses = _listening(registry)
    config = load_config(
        assignments=[
            *choice,
            *NARROW,
            "train.epochs=1",
            "train.max_steps_per_epoch=20",
            "train.batch_size=128",
            "train.log_every=1",
            "train.disable=['progress']",
            "knn.baseline=false",
            "health.baseline=false",
            f"train.out={tmp_path / 'run'}",
        ],
        plugin_settings=registry.settings_classes(),
    )
    summary = train(config, registry)
    assert {k: summary["components"][k] for k in expected} == expected
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    saved = (tmp_path / "run" / "settings.toml").read_text()
    for component, plugin in expected.items():
        assert f'{component} = "{plugin}"' in saved


def test_byol_loss_brings_its_own_predictor_after_an_encoder_without_one(registry):
    from sslplug.config import RunContext
    from sslplug.nn import build_backbone

    config = load_config(
        assignments=["components.plugin=barlow_twins", "components.loss=byol", *NARROW],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 32)
    components = registry.build(config, RunContext(config=config, image_size=32), backbone, dim)
    assert components.loss.predictor is not None
    assert components.loss.predictor[0].in_features == components.encoder.projection_dim == 128


def test_a_mix_that_cannot_work_names_both_components(registry):
    from sslplug.config import RunContext
    from sslplug.nn import build_backbone

    class OneView(sslplug.ViewGenerator):
        def forward(self, batch):
            return sslplug.Views(images=(sslplug.normalize(sslplug.to_float(batch)),))

    @sslplug.hookimpl
    def sslplug_views():
        return OneView()

    plugin = types.ModuleType("single_view")
    plugin.sslplug_views = sslplug_views
    registry.register(plugin, "single_view")
    config = load_config(
        assignments=["components.plugin=simclr", "components.views=single_view"],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 32)
    with pytest.raises(ComponentMismatchError) as info:
        registry.build(config, RunContext(config=config, image_size=32), backbone, dim)
    message = str(info.value)
    assert "the loss from plugin 'simclr' requires two_views" in message
    assert "views from 'single_view'" in message


def test_pretext_losses_need_their_own_labels(registry):
    from sslplug.config import RunContext
    from sslplug.nn import build_backbone

    config = load_config(
        assignments=["components.plugin=rotnet", "components.loss=jigsaw"],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 32)
    with pytest.raises(
        ComponentMismatchError, match=r"loss from plugin 'jigsaw' requires permutation_labels"
    ):
        registry.build(config, RunContext(config=config, image_size=32), backbone, dim)


def test_a_refusal_raised_inside_a_hook_names_the_other_plugins(registry):
    from sslplug.config import RunContext
    from sslplug.nn import build_backbone

    @sslplug.hookimpl
    def sslplug_augmentation():
        return sslplug.Augmentations([sslplug.Normalization()] * 3)

    plugin = types.ModuleType("three_views")
    plugin.sslplug_augmentation = sslplug_augmentation
    registry.register(plugin, "three_views")
    config = load_config(
        assignments=["components.plugin=cpc", "components.augmentation=three_views"],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 32)
    with pytest.raises(ComponentMismatchError) as info:
        registry.build(config, RunContext(config=config, image_size=32), backbone, dim)
    message = str(info.value)
    assert "plugin 'cpc' cannot build its views" in message
    assert "augmentation from 'three_views'" in message
    assert "CPC's views need two augmentation modules" in message  # the plugin's own words
