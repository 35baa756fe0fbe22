"""Settings: defaults, TOML files, --set parsing, and errors that list what is valid."""

from __future__ import annotations

import logging
import warnings

import pytest
import tomli_w
from sslplug_methods import byol, rotnet, simclr

from sslplug.config import MovedSettingWarning, RunConfig, load_config, parse_assignment
from sslplug.errors import ConfigError
from sslplug.monitors.health import HealthSettings
from sslplug.monitors.knn import KNNSettings
from sslplug.monitors.tensorboard import TensorBoardSettings

PLUGINS = {"byol": byol.BYOLSettings}
# the core's monitors declare their sections as plugins do
MONITORS = {"knn": KNNSettings, "health": HealthSettings, "tensorboard": TensorBoardSettings}


def test_defaults_without_input():
    config = load_config(plugin_settings=PLUGINS)
    assert config.components.plugin == "byol"
    assert config.data.name == "shapes"
    assert config.plugins["byol"].tau_base == 0.996


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.epochs=5", ("train", "epochs", 5)),
        ("byol.tau_base=0.99", ("byol", "tau_base", 0.99)),
        ("train.channels_last=false", ("train", "channels_last", False)),
        ("data.name=cifar10", ("data", "name", "cifar10")),
        ("byol.crop_scale=[0.2, 1.0]", ("byol", "crop_scale", [0.2, 1.0])),
        ("data.name=../shared/data/x", ("data", "name", "../shared/data/x")),
    ],
)
def test_parse_assignment_reads_toml_values(text, expected):
    section, key, (value, _raw) = parse_assignment(text)
    assert (section, key, value) == expected


def test_set_overrides_with_types_checked():
    config = load_config(
        assignments=["byol.tau_base=0.99", "train.epochs=3", "byol.crop_scale=[0.2, 1]"],
        plugin_settings=PLUGINS,
    )
    assert config.plugins["byol"].tau_base == 0.99
    assert config.train.epochs == 3
    assert config.plugins["byol"].crop_scale == (0.2, 1.0)


def test_a_number_for_a_string_setting_is_kept_as_text():
    assert load_config(assignments=["data.name=10"]).data.name == "10"


def test_unknown_key_lists_valid_keys_and_suggests_one():
    with pytest.raises(ConfigError) as info:
        load_config(assignments=["byol.tau_bse=0.9"], plugin_settings=PLUGINS)
    message = str(info.value)
    assert "tau_bse" in message and "Did you mean 'tau_base'" in message
    assert "projection_dim" in message


def test_unknown_section_lists_sections_including_plugins():
    with pytest.raises(
        ConfigError, match=r"unknown settings section 'trian'.*Did you mean 'train'.*byol"
    ):
        load_config(assignments=["trian.epochs=3"], plugin_settings=PLUGINS)


@pytest.mark.parametrize(
    ("assignment", "pattern"),
    [
        ("train.epochs=many", r"train\.epochs must be int, got 'many'"),
        ("train.epochs=2.5", r"train\.epochs must be int, got 2\.5"),
        ("train.channels_last=1", r"train\.channels_last must be bool"),
        ("optim.name=adam", r"optim\.name must be one of 'adamw', 'sgd', 'lars', got 'adam'"),
        ("byol.crop_scale=[0.2]", r"byol\.crop_scale must be a list of 2 values"),
        ("train.epochs=0", r"epochs must be greater than 0, got 0"),
        ("byol.tau_base=1.5", r"tau_base must be between 0 and 1, got 1\.5"),
        ("train", r"expects section\.key=value"),
        ("epochs=3", r"one dot"),
    ],
)
def test_bad_values_name_the_value_and_what_is_valid(assignment, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(assignments=[assignment], plugin_settings=PLUGINS)


def test_config_file_then_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nepochs = 7\nbatch_size = 64\n[byol]\ntau_base = 0.98\n")
    config = load_config(path, ["train.epochs=9"], PLUGINS)
    assert (config.train.epochs, config.train.batch_size) == (9, 64)
    assert config.plugins["byol"].tau_base == 0.98


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        load_config(wrong)


def test_saved_settings_load_back_unchanged(tmp_path):
    config = load_config(
        assignments=["byol.tau_base=0.97", "optim.name=lars", "data.name=cifar10"],
        plugin_settings=PLUGINS,
    )
    path = tmp_path / "settings.toml"
    path.write_text(tomli_w.dumps(config.to_dict()))
    again = load_config(path, plugin_settings=PLUGINS)
    assert isinstance(again, RunConfig)
    assert again == config


def _old_settings(**components: str) -> dict[str, dict]:
    """Saved settings of a run made while another plugin, ``dino``, was installed too."""
    saved = load_config(plugin_settings=PLUGINS).to_dict()
    saved["components"].update(components)
    saved["dino"] = {"teacher_temperature": 0.04}
    return saved


def test_saved_section_of_an_uninstalled_unused_plugin_is_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sslplug.config"):
        config = load_config(
            assignments=["train.epochs=3"], plugin_settings=PLUGINS, base=_old_settings()
        )
    assert config.train.epochs == 3 and set(config.plugins) == {"byol"}
    assert "[dino]" in caplog.text and "not installed" in caplog.text


def test_saved_section_of_an_uninstalled_plugin_the_run_uses_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown settings section in the saved settings 'dino'"):
        load_config(plugin_settings=PLUGINS, base=_old_settings(loss="dino"))


def test_a_set_that_chooses_the_uninstalled_plugin_makes_its_saved_section_an_error():
    with pytest.raises(ConfigError, match=r"unknown settings section in the saved settings 'dino'"):
        load_config(None, ["components.loss=dino"], PLUGINS, base=_old_settings())
    # and the other way round: --set moves the run off it, so its section is left out
    base = _old_settings(loss="dino")
    assert load_config(None, ["components.loss=byol"], PLUGINS, base=base).plugins == {
        "byol": byol.BYOLSettings()
    }


def test_unknown_sections_on_the_command_line_stay_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[dino]\nteacher_temperature = 0.04\n")
    with pytest.raises(ConfigError, match=r"unknown settings section in .*run\.toml 'dino'"):
        load_config(path, plugin_settings=PLUGINS, base=_old_settings())
    with pytest.raises(ConfigError, match=r"unknown settings section 'dino'"):
        load_config(None, ["dino.x=1"], plugin_settings=PLUGINS, base=_old_settings())


def test_to_dict_keeps_core_sections_and_the_plugin_sections_asked_for():
    config = load_config(
        assignments=["components.loss=simclr"],
        plugin_settings={
            **PLUGINS,
            "simclr": simclr.SimCLRSettings,
            "rotnet": rotnet.RotNetSettings,
        },
    )
    assert config.used_plugin_sections() == ["byol", "simclr"]
    saved = config.to_dict(config.used_plugin_sections())
    assert set(saved) == {"components", "data", "model", "optim", "train", "byol", "simclr"}
    assert saved["simclr"]["temperature"] == 0.5
    assert "rotnet" in config.to_dict()  # without a choice: every plugin section
    assert set(config.to_dict([])) == set(saved) - {"byol", "simclr"}


def test_used_plugin_sections_leaves_out_none_and_plugins_without_settings():
    config = load_config(
        assignments=["components.target_update=none", "components.views=nosettings"],
        plugin_settings=PLUGINS,
    )
    assert config.used_plugin_sections() == ["byol"]


def test_the_monitors_declare_their_sections_through_the_registry(registry):
    assert {name: registry.settings_classes()[name] for name in MONITORS} == MONITORS
    assert "knn" not in registry.names()  # still the core's own, not an installed plugin
    config = load_config(assignments=["knn.k=10", "health.samples=64"], plugin_settings=MONITORS)
    assert (config.plugins["knn"].k, config.plugins["health"].samples) == (10, 64)
    # a run saves them (what `sslplug eval` measures with, what a resume continues with)
    assert config.used_plugin_sections() == ["health", "knn", "tensorboard"]
    # read without their classes, a run's monitors take their defaults
    assert load_config().settings_of("knn", KNNSettings) == KNNSettings()


def _moved(
    assignments: list[str], config_file=None, base=None
) -> tuple[RunConfig, list[str]]:
    """The settings, and the messages of the ``MovedSettingWarning``s they gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(config_file, assignments, {**PLUGINS, **MONITORS}, base=base)
    return config, [str(w.message) for w in caught if w.category is MovedSettingWarning]


def test_the_old_eval_keys_still_set_the_monitors_settings_with_a_warning(tmp_path):
    config, said = _moved(["eval.knn_k=10", "eval.every=1", "eval.health_samples=64"])
    assert (config.plugins["knn"].k, config.plugins["health"].samples) == (10, 64)
    assert config.plugins["knn"].every == config.plugins["health"].every == 1
    assert said == [
        "--set eval.knn_k is deprecated and will be removed; use knn.k instead",
        "--set eval.every is deprecated and will be removed; use knn.every and health.every "
        "instead",
        "--set eval.health_samples is deprecated and will be removed; use health.samples "
        "instead",
    ]
    path = tmp_path / "run.toml"
    path.write_text("[eval]\nknn_temperature = 0.2\nbaseline = false\nembedding_samples = 0\n")
    config, said = _moved([], path)
    assert config.plugins["knn"].temperature == 0.2
    assert config.plugins["knn"].baseline is config.plugins["health"].baseline is False
    assert config.plugins["tensorboard"].embedding_samples == 0
    assert said[0] == (
        f"eval.knn_temperature in {path} is deprecated and will be removed; use knn.temperature "
        f"instead"
    )
    # a bad value is named as it was given
    with (
        pytest.raises(ConfigError, match=r"^eval\.knn_temperature must be a finite number"),
        pytest.warns(MovedSettingWarning),
    ):
        load_config(assignments=["eval.knn_temperature=nan"], plugin_settings=MONITORS)
    with pytest.raises(ConfigError, match=r"unknown key in \[eval\] 'knn_kk'.*'knn_k'"):
        load_config(assignments=["eval.knn_kk=3"], plugin_settings=MONITORS)
    with pytest.raises(ConfigError, match=r"eval\.knn_k is now knn\.k, and no plugin 'knn'"):
        load_config(assignments=["eval.knn_k=3"])


def test_train_progress_false_still_switches_the_bar_off_with_a_warning():
    config, said = _moved(["train.progress=false", "train.disable=['knn']"])
    assert config.train.disable == ("knn", "progress")
    assert said == [
        "--set train.progress is deprecated and will be removed; use --disable progress instead"
    ]
    assert _moved(["train.progress=true"])[0].train.disable == ()
    with pytest.raises(ConfigError, match=r"train\.progress must be bool, got 1"):
        load_config(assignments=["train.progress=1"])


def test_settings_saved_before_the_monitors_had_sections_load_without_a_warning():
    saved = load_config(plugin_settings=PLUGINS).to_dict()
    saved["train"]["progress"] = False
    saved["eval"] = {
        "knn_k": 20, "knn_temperature": 0.1, "every": 1, "baseline": True,
        "embedding_samples": 0, "health_samples": 256,
    }  # fmt: skip
    config, said = _moved([], base=saved)
    assert said == []
    assert (config.plugins["knn"].k, config.plugins["health"].every) == (20, 1)
    assert config.train.disable == ("progress",)
    # and a registry without the monitors leaves their old settings out
    assert load_config(plugin_settings=PLUGINS, base=saved).plugins == {"byol": byol.BYOLSettings()}
