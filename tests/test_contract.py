"""The second version of the contract: capabilities, augmentations that say what they produce,
views in groups and of several sizes, the typed loss result, faults on any step named by plugin,
lifecycle hooks that see errors, and lifecycle plugins the user switches off."""

from __future__ import annotations

import types
import warnings

import attrs
import pytest
import torch
from torch import nn

import sslplug
from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.config import RunContext, load_config, read_toml
from sslplug.engine import ComponentFailure, train
from sslplug.errors import ComponentMismatchError, ConfigError, PluginError
from sslplug.monitors.view_grid import view_grid
from sslplug.nn import build_backbone
from sslplug.plugins import PluginRegistry

from .conftest import FAST


def _build(registry: PluginRegistry, *assignments: str):
    config = load_config(None, list(assignments), registry.settings_classes())
    run = RunContext(config=config, image_size=32, steps_per_epoch=2, total_steps=4)
    backbone, dim = build_backbone("small", 32)
    return registry.build(config, run, backbone, dim)


def _train(registry, shapes_folder, tmp_path, *assignments: str, epochs: int = 1) -> dict:
    config = load_config(
        assignments=[
            *FAST,
            f"data.name={shapes_folder}",
            f"train.epochs={epochs}",
            f"train.out={tmp_path}",
            *assignments,
        ],
        plugin_settings=registry.settings_classes(),
    )
    return train(config, registry)


def _plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, sslplug.hookimpl(fn))
    return module


# capabilities ---------------------------------------------------------------------------------


def test_byol_with_the_cpc_augmentation_is_refused_before_the_first_step(registry, capsys):
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "components.plugin=byol", "components.augmentation=cpc")
    message = str(info.value)
    assert "'byol'" in message and "'cpc'" in message and "normalized_views" in message
    # the same through the command line: an error, no traceback, before any step
    assert main(["run", "--plugin", "byol", "--augmentation", "cpc", "--no-progress"]) == 2
    assert "requires normalized_views" in capsys.readouterr().err


def test_an_unregistered_capability_is_registered_on_behalf_with_a_warning(registry):
    # capability names were free strings in the first API: such a plugin keeps working
    class Encoder(sslplug.ProjectorEncoder):
        provides = frozenset({"projection", "made_up_thing"})

    def sslplug_encoder(backbone, feature_dim):
        return Encoder(backbone, feature_dim, nn.Linear(feature_dim, 8), 8)

    registry.register(_plugin("odd", sslplug_encoder=sslplug_encoder), "odd")
    with pytest.warns(DeprecationWarning, match=r"encoder of plugin 'odd'.*'made_up_thing'.*regi"):
        parts = _build(registry, "components.plugin=simclr", "components.encoder=odd")
    assert "made_up_thing" in parts.encoder.provides
    assert [c.name for c in registry.capabilities_of("odd")] == ["made_up_thing"]


def test_hook_capabilities_registers_names_that_components_may_then_use(registry, capsys):
    class Encoder(sslplug.ProjectorEncoder):
        provides = frozenset({"projection", "made_up_thing"})

    def sslplug_capabilities(register):
        register("made_up_thing", "a thing nobody else provides")

    def sslplug_encoder(backbone, feature_dim):
        return Encoder(backbone, feature_dim, nn.Linear(feature_dim, 8), 8)

    plugin = _plugin(
        "odd", sslplug_capabilities=sslplug_capabilities, sslplug_encoder=sslplug_encoder
    )
    assert registry.register(plugin, "odd")
    parts = _build(registry, "components.plugin=simclr", "components.encoder=odd")
    assert "made_up_thing" in parts.encoder.provides
    assert [c.name for c in registry.capabilities_of("odd")] == ["made_up_thing"]
    assert registry.capabilities_of("cpc")[0].name == "image_then_patch_pipelines"


def test_a_capability_name_must_be_an_identifier(registry):
    def sslplug_capabilities(register):
        register("two words", "no")

    assert not registry.register(_plugin("bad", sslplug_capabilities=sslplug_capabilities), "bad")
    assert "capability name is an identifier" in registry.failures[-1].error


# augmentations --------------------------------------------------------------------------------


def test_hook_augmentation_returning_a_list_is_accepted_with_a_deprecation_warning(registry):
    def sslplug_augmentation(run):
        return list(sslplug.byol_recipe(run.image_size))  # a plain list, as version 1 allowed

    registry.register(_plugin("listy", sslplug_augmentation=sslplug_augmentation), "listy")
    with pytest.warns(DeprecationWarning, match="plugin 'listy' returned a plain list"):
        parts = _build(registry, "components.plugin=byol", "components.augmentation=listy")
    assert isinstance(parts.augmentations, sslplug.Augmentations)
    assert len(parts.augmentations) == 2 and "normalized_views" in parts.augmentations.provides


def test_recipes_return_augmentations_and_builtins_give_no_deprecation(registry):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in ("byol", "simclr", "barlow_twins", "rotnet", "jigsaw", "cpc"):
            parts = _build(registry, f"components.plugin={name}")
            assert isinstance(parts.augmentations, sslplug.Augmentations), name


# settings -------------------------------------------------------------------------------------


@attrs.define
class _NoDefault:
    width: int  # no default: the settings cannot be built


def test_a_settings_class_without_defaults_leaves_that_plugin_out_and_others_work(capsys):
    registry = PluginRegistry()
    registry.load_entry_points()
    broken = _plugin("nodefault", sslplug_settings=lambda: _NoDefault)
    assert not registry.register(broken, "nodefault")
    failure = registry.failures[-1]
    assert failure.name == "nodefault" and "give every field a default" in failure.error
    assert "nodefault" not in registry.settings_classes()
    _build(registry, "components.plugin=byol")  # the rest is unaffected
    strict = PluginRegistry(strict=True)
    with pytest.raises(PluginError, match=r"nodefault.*cannot be built from its defaults"):
        strict.register(broken, "nodefault")


# views in groups, of several sizes ------------------------------------------------------------


def test_run_by_resolution_calls_once_per_size_and_keeps_the_order():
    calls: list[tuple[int, ...]] = []

    def module(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.mean(dim=(1, 2, 3), keepdim=False)[:, None] + x.shape[-1]

    views = [torch.rand(4, 3, s, s) for s in (32, 32, 14, 14, 14)]
    out = sslplug.run_by_resolution(module, views)
    assert calls == [(8, 3, 32, 32), (12, 3, 14, 14)]
    for view, result in zip(views, out):
        torch.testing.assert_close(result[:, 0], view.mean(dim=(1, 2, 3)) + view.shape[-1])


def test_views_select_groups_and_validate_names():
    images = tuple(torch.rand(2, 3, s, s) for s in (8, 8, 4))
    views = sslplug.Views(images=images, groups=("global", "global", "local"))
    chosen = views.select(("global",))
    assert len(chosen.images) == 2 and chosen.groups == ("global", "global")
    assert views.indices("local") == (2,)
    assert sslplug.Views(images=images).group_names() == ("global",) * 3
    with pytest.raises(ValueError, match="no view belongs to the groups"):
        views.select(("teacher",))
    with pytest.raises(ValueError, match="one group name per view"):
        sslplug.Views(images=images, groups=("global",))


def test_the_view_grid_shows_views_of_different_sizes():
    views = (torch.zeros(8, 3, 32, 32), torch.zeros(8, 3, 14, 14))
    grid = view_grid(views)
    assert grid is not None and grid.shape[0] == 3
    assert grid.shape[1] == 2 * 33 + 1 and grid.shape[2] == 8 * 33 + 1


def test_projector_encoder_takes_global_and_local_crops(registry):
    parts = _build(registry, "components.plugin=simclr")
    views = sslplug.Views(
        images=(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.rand(4, 3, 16, 16)),
        groups=("global", "global", "local"),
    )
    parts.encoder.eval()
    outputs = parts.encoder(views)
    assert [p.shape[0] for p in outputs.projections] == [4, 4, 4]


# faults on any step, named by plugin -----------------------------------------------------------


class _Silent(sslplug.TargetUpdate):
    """A target update whose step returns nothing (``None``), on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def forward(self, views):
        return sslplug.Outputs()

    def step(self, encoder, step, total_steps):
        self.steps += 1


def test_a_target_update_returning_none_from_step_is_fine_on_logged_steps(
    registry, shapes_folder, tmp_path
):
    registry.register(_plugin("silent", sslplug_target_update=lambda: _Silent()), "silent")
    summary = _train(
        registry,
        shapes_folder,
        tmp_path,
        "components.plugin=simclr",
        "components.target_update=silent",
        "knn.baseline=false",
        "health.baseline=false",
    )
    assert summary["steps"] == 2 and summary["components"]["target_update"] == "silent"


class _VectorMetric(sslplug.Loss):
    def forward(self, outputs, views, target):
        z = outputs.projections[0]
        return sslplug.LossResult(z.pow(2).mean(), {"per_dim": z.detach().mean(0)})


class _BareTensor(sslplug.Loss):
    def forward(self, outputs, views, target):
        return outputs.projections[0].pow(2).mean()


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (_VectorMetric, r"plugin 'bad'.*loss logged the metric 'per_dim' of shape \(\d+,\)"),
        (_BareTensor, r"plugin 'bad'.*loss returned Tensor.*sslplug.LossResult\(loss, metrics\)"),
    ],
    ids=["non-scalar-metric", "bare-tensor"],
)
def test_hook_loss_faults_name_the_plugin_and_what_the_contract_expects(
    registry, shapes_folder, tmp_path, loss, expected
):
    registry.register(_plugin("bad", sslplug_loss=lambda: loss()), "bad")
    with pytest.raises(ComponentFailure, match=expected):
        _train(
            registry,
            shapes_folder,
            tmp_path,
            "components.plugin=simclr",
            "components.loss=bad",
            "train.log_every=100",  # only the epoch's last step logs
        )


# lifecycle ------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.ends: list[tuple[dict, BaseException | None]] = []
        self.evaluations: list[int] = []

    @sslplug.hookimpl
    def sslplug_evaluate(self, run, epoch):
        self.evaluations.append(epoch)
        return {"probe": float(epoch) + 0.5}

    @sslplug.hookimpl
    def sslplug_run_end(self, summary, error):
        self.ends.append((summary, error))


def test_hook_evaluate_results_reach_the_history_summary_and_checkpoint(
    registry, shapes_folder, tmp_path
):
    recorder = _Recorder()
    registry.register(recorder, "recorder")
    summary = _train(registry, shapes_folder, tmp_path, epochs=2)
    assert recorder.evaluations == [0, 1, 2]
    assert summary["baseline"]["probe"] == 0.5 and "knn_top1" in summary["baseline"]
    history = load_checkpoint(tmp_path)["history"]
    assert [h["probe"] for h in history] == [1.5, 2.5]
    assert recorder.ends[0][1] is None and recorder.ends[0][0]["epochs"] == 2


def test_hook_run_end_is_called_with_the_error_when_a_run_fails(registry, shapes_folder, tmp_path):
    recorder = _Recorder()
    registry.register(recorder, "recorder")
    registry.register(_plugin("bad", sslplug_loss=lambda: _BareTensor()), "bad")
    with pytest.raises(ComponentFailure):
        _train(registry, shapes_folder, tmp_path, "components.plugin=simclr", "components.loss=bad")
    ((summary, error),) = recorder.ends
    assert isinstance(error, ComponentFailure) and summary["steps"] == 0


def test_disabled_lifecycle_plugins_do_not_run(registry, shapes_folder, tmp_path):
    summary = _train(
        registry,
        shapes_folder,
        tmp_path,
        'train.disable=["tensorboard", "view_grid", "knn", "health"]',
    )
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "views.png").exists()
    assert summary["knn_top1"] is None and summary["knn_top1_random_init"] is None
    assert summary["health_history"] == []
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "summary.json").is_file()


def test_disable_on_the_command_line_and_its_errors(fast_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*fast_args, "--disable", "tensorboard", "--epochs", "1"]) == 0
    assert not (run / "tensorboard").exists() and (run / "views.png").is_file()
    # FAST switches the bar off (train.disable); --disable adds to that list
    assert read_toml(run / "settings.toml")["train"]["disable"] == ["progress", "tensorboard"]
    assert main([*fast_args, "--disable", "tensorbored"]) == 2
    assert "--disable 'tensorbored': no plugin of that name" in capsys.readouterr().err
    assert main([*fast_args, "--disable", "byol"]) == 2
    assert "supplies a component of this run" in capsys.readouterr().err


def test_the_view_generator_state_is_checkpointed(registry, shapes_folder, tmp_path):
    _train(registry, shapes_folder, tmp_path, "knn.baseline=false", "health.baseline=false")
    state = load_checkpoint(tmp_path)
    assert "views" in state and isinstance(state["views"], dict)


def test_unknown_disable_name_is_a_config_error(registry):
    registered = "Registered: tensorboard, progress, knn, health, view_grid"
    with pytest.raises(ConfigError, match=registered):
        registry.lifecycle(["nope"], used={"byol"})


def test_a_component_keeping_run_shares_it_when_deep_copied():
    import copy

    from sslplug.config import RunConfig

    run = RunContext(config=RunConfig(), image_size=32, steps_per_epoch=4, total_steps=8)

    class Scheduled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.run = run
            self.linear = nn.Linear(2, 2)

    module = Scheduled()
    twin = copy.deepcopy(module)
    assert twin.run is run and twin.linear is not module.linear
    run.progress.step = 6
    assert twin.run.progress.epoch_float == 1.5 and twin.run.progress.fraction == 0.75


class _Crashing:
    @sslplug.hookimpl
    def sslplug_epoch_end(self, epoch):
        raise ValueError("logger broke")


def test_a_lifecycle_plugin_that_raises_is_named(registry, shapes_folder, tmp_path):
    registry.register(_Crashing(), "crashing")
    expected = r"lifecycle plugin 'crashing' raised in sslplug_epoch_end"
    with pytest.raises(PluginError, match=expected):
        _train(registry, shapes_folder, tmp_path, "knn.baseline=false", "health.baseline=false")
    assert load_checkpoint(tmp_path)["epoch"] == 1  # the epoch it ended was saved first


def test_disable_adds_to_the_config_file(fast_args, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[train]\ndisable = ["knn"]\n')
    at = fast_args.index("train.disable=['progress']")  # a --set would replace the file's list
    args = [*fast_args[: at - 1], *fast_args[at + 1 :], "--config", str(config)]
    args += ["--disable", "tensorboard", "--epochs", "1"]
    assert main(args) == 0
    saved = read_toml(tmp_path / "run" / "settings.toml")["train"]["disable"]
    assert saved == ["knn", "tensorboard"]


@attrs.define
class _WatcherSettings:
    every: int = 1


class _Watcher:
    """A lifecycle plugin with settings of its own: no component, yet part of the run."""

    @sslplug.hookimpl
    def sslplug_settings(self):
        return _WatcherSettings

    @sslplug.hookimpl
    def sslplug_epoch_end(self, epoch):
        pass


def test_the_settings_of_a_lifecycle_plugin_are_saved_with_the_run(
    registry, shapes_folder, tmp_path
):
    assert registry.register(_Watcher(), "watcher")
    _train(
        registry,
        shapes_folder,
        tmp_path,
        "watcher.every=3",
        "knn.baseline=false",
        "health.baseline=false",
    )
    assert read_toml(tmp_path / "settings.toml")["watcher"] == {"every": 3}
    assert load_checkpoint(tmp_path)["settings"]["watcher"] == {"every": 3}
    assert "simclr" not in read_toml(tmp_path / "settings.toml")  # plugins the run does not use
