"""Settings: defaults, TOML files, --set parsing, and errors that list what is valid."""

from __future__ import annotations

import logging

import pytest
from sslplug_methods import byol
from sslplug_methods import rotnet
from sslplug_methods import simclr
import tomli_w

from sslplug.config import RunConfig, load_config, parse_assignment
from sslplug.errors import ConfigError

PLUGINS = {"byol": byol.BYOLSettings}


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
        ("train.progress=false", ("train", "progress", False)),
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
        ("train.progress=1", r"train\.progress must be bool"),
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
    assert set(saved) == {"components", "data", "model", "optim", "train", "eval", "byol", "simclr"}
    assert saved["simclr"]["temperature"] == 0.5
    assert "rotnet" in config.to_dict()  # without a choice: every plugin section
    assert set(config.to_dict([])) == set(saved) - {"byol", "simclr"}


def test_used_plugin_sections_leaves_out_none_and_plugins_without_settings():
    config = load_config(
        assignments=["components.target_update=none", "components.views=nosettings"],
        plugin_settings=PLUGINS,
    )
    assert config.used_plugin_sections() == ["byol"]
