"""Messages a user meets first (issue 25): an unknown plugin named as the user typed it, with
the closest installed name; ``info`` of the core's lifecycle plugins; every bad setting, plugin
name and ``--disable`` name of one command reported together."""

from __future__ import annotations

import re

import pytest

from sslplug.commands import main
from sslplug.config import MovedSettingWarning, load_config
from sslplug.errors import ConfigError, PluginError
from sslplug.settings_values import Problems, did_you_mean

# ------------------------------------------------------------------------------------------
# 1. an unknown plugin: the option the user typed, the closest name, the installed ones


@pytest.mark.parametrize(
    ("args", "named", "closest"),
    [
        (["--plugin", "nosuch"], "(--plugin nosuch).", None),
        (["--plugin", "byl"], "(--plugin byl).", "byol"),
        (["--loss", "vicrg"], "(--loss vicrg).", "vicreg"),
        (["--plugin", "simclr", "--encoder", "simclr_"], "(--encoder simclr_).", "simclr"),
        (["--target-update", "bylo"], "(--target-update bylo).", "byol"),
        (["--set", "components.loss=barlow"], "(--set components.loss=barlow).", "barlow_twins"),
        # --set comes after the flags, as in load_config: the message names the one that counted
        (
            ["--plugin", "byol", "--set", "components.plugin=simsam"],
            "(--set components.plugin=simsam).",
            "simsiam",
        ),
    ],
)
def test_an_unknown_plugin_is_named_by_the_option_typed_with_the_closest(
    args, named, closest, capsys
):
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslplug: error: unknown plugin ")
    assert named in err, err
    assert "for the augmentation" not in err
    hint = f"Did you mean {closest!r}?" if closest else "Did you mean"
    assert (hint in err) is (closest is not None), err
    assert re.search(r"Installed plugins: barlow_twins, byol, .*vicreg", err), err


def test_every_unknown_plugin_and_missing_component_is_reported_at_once(capsys):
    args = ["--plugin", "simclr", "--loss", "vicrg", "--target-update", "simclr", "--encoder", "x"]
    assert main(["run", *args]) == 2
    header, *lines = capsys.readouterr().err.splitlines()
    assert header == "sslplug: error: 3 component choices are not valid:"
    # in the order of sslplug.COMPONENTS: encoder, loss, target update
    assert lines[0].startswith("  unknown plugin 'x' (--encoder x). Installed plugins: ")
    assert lines[1].startswith("  unknown plugin 'vicrg' (--loss vicrg). Did you mean 'vicreg'?")
    assert lines[2].startswith(
        "  plugin 'simclr' provides no target_update. Plugins that do: byol, dino, "
    )
    assert len(lines) == 3


def test_one_unknown_plugin_for_every_component_is_one_line(capsys):
    assert main(["run", "--plugin", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("unknown plugin 'nosuch'") == 1 and "not valid:" not in err


def test_a_lifecycle_plugin_chosen_for_a_component_is_told_apart(capsys):
    assert main(["run", "--plugin", "knn"]) == 2
    assert (
        "unknown plugin 'knn' (--plugin knn). It is one of the core's lifecycle plugins, which "
        "supply no component. Installed plugins: barlow_twins"
    ) in capsys.readouterr().err


def test_bench_names_its_plugin_option_with_the_closest(capsys):
    assert main(["bench", "--plugin", "byl"]) == 2
    assert (
        "sslplug: error: unknown plugin 'byl' (--plugin byl). Did you mean 'byol'? Installed "
        "plugins: barlow_twins, byol"
    ) in capsys.readouterr().err


def test_an_unknown_plugin_from_a_config_file_is_named_by_its_setting(registry, tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('[components]\nplugin = "simclr"\nloss = "nt_xnet"\n')
    config = load_config(config_file, plugin_settings=registry.settings_classes())
    with pytest.raises(PluginError, match=r"unknown plugin 'nt_xnet' \(components.loss = "):
        registry.resolve(config)


def test_disable_of_an_unknown_plugin_suggests_the_closest(registry):
    with pytest.raises(ConfigError) as info:
        registry.lifecycle(["tensorbord"])
    message = str(info.value)
    assert message.startswith("--disable 'tensorbord': no plugin of that name.")
    assert "Did you mean 'tensorboard'?" in message
    assert "Registered: tensorboard, progress, knn, health, view_grid, barlow_twins" in message


def test_every_bad_disable_name_is_reported_at_once(registry):
    with pytest.raises(ConfigError) as info:
        registry.lifecycle(["tensorbord", "knn", "byol", "knnn"], used={"byol"})
    header, *lines = str(info.value).splitlines()
    assert header == "3 plugins to disable are not valid:"
    assert lines[0].startswith("  --disable 'tensorbord': no plugin of that name. Did you mean ")
    assert lines[1].startswith("  --disable 'byol': that plugin supplies a component of this run")
    assert lines[2].startswith("  --disable 'knnn': no plugin of that name. Did you mean 'knn'?")


def test_plugins_sections_and_keys_share_one_hint():
    assert did_you_mean("byl", ["byol", "simclr"]) == " Did you mean 'byol'?"
    assert did_you_mean("zzz", ["byol", "simclr"]) == ""
    with pytest.raises(ConfigError, match=re.escape("'trian'. Did you mean 'train'?")):
        load_config(assignments=["trian.epochs=1"])


# ------------------------------------------------------------------------------------------
# 2. ``sslplug info`` of the core's lifecycle plugins


@pytest.mark.parametrize("name", ["tensorboard", "progress", "knn", "health", "view_grid"])
def test_info_describes_every_lifecycle_plugin_that_list_shows(name, capsys):
    assert main(["list"]) == 0
    assert name in capsys.readouterr().out.split("core lifecycle plugins")[1]
    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: a lifecycle plugin of the core (sslplug ")
    assert f"code: sslplug.monitors.{name}\n" in out
    assert f"--disable {name}" in out and f'disable = ["{name}"] under [train]' in out
    assert re.search(r"\nhooks: sslplug_\w+", out), out
    assert "sslplug_settings" not in out  # the hook that declares the section, not a lifecycle one


def test_info_of_a_lifecycle_plugin_shows_its_section_with_defaults(capsys):
    assert main(["info", "knn"]) == 0
    out = capsys.readouterr().out
    assert "The kNN monitor: weighted kNN accuracy" in out
    assert "hooks: sslplug_evaluate\n" in out
    assert "settings ([knn] in a TOML file, or --set knn.KEY=VALUE):" in out
    assert "  k = 200  (int)\n" in out and "  baseline = True  (bool)\n" in out
    assert main(["info", "health"]) == 0
    assert "  samples = 1024  (int)\n" in capsys.readouterr().out
    assert main(["info", "progress"]) == 0
    assert capsys.readouterr().out.endswith("settings: none\n")


def test_info_of_a_misspelt_lifecycle_plugin_suggests_it(capsys):
    assert main(["info", "hea1th"]) == 2
    assert "no plugin named 'hea1th'. Did you mean 'health'?" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# 3. every bad setting of one load, reported together


def test_two_bad_values_on_the_command_line_are_both_reported(capsys):
    assert main(["run", "--set", "train.epochs=-1", "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "sslplug: error: 2 settings are not valid:\n"
        "  [train] epochs must be greater than 0, got -1\n"
        "  [train] batch_size must be greater than 0, got 0\n"
    )


def test_a_config_file_s_bad_sections_keys_and_values_come_with_those_of_set(registry, tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        '[train]\nepochs = -1\nbatch_sise = 64\n[optim]\nlr = "fast"\n[trian]\nepochs = 1\n'
    )
    assignments = ["knn.k=0", "data.test_fraction=1.5", "eval.knn_temperature=nan", "nodot=1"]
    with pytest.raises(ConfigError) as info, pytest.warns(MovedSettingWarning):
        load_config(config_file, assignments, registry.settings_classes())
    header, *lines = str(info.value).splitlines()
    assert header == "8 settings are not valid:"
    # what is read (the file, then each --set), then each section as it is built
    expected = [
        f"unknown settings section in {config_file} 'trian'. Did you mean 'train'?",
        "--set expects section.key=value with one dot in the name, got 'nodot'",
        "[data] test_fraction must be at least 0 and below 1, got 1.5",
        "optim.lr must be float, got 'fast'",
        "unknown key in [train] 'batch_sise'. Did you mean 'batch_size'?",
        "[train] epochs must be greater than 0, got -1",
        # a value given under its old name is named so; a section's types before its ranges
        "eval.knn_temperature must be a finite number, got nan",
        "[knn] k must be greater than 0, got 0",
    ]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith("  " + start), (line, start)


def test_one_bad_value_keeps_its_one_line_message():
    with pytest.raises(ConfigError) as info:
        load_config(assignments=["train.epochs=0"])
    assert str(info.value) == "[train] epochs must be greater than 0, got 0"


def test_problems_flatten_the_errors_of_a_section_into_one_list():
    problems = Problems()
    with problems.noting():
        load_config(assignments=["train.epochs=0", "train.log_every=0"])
    with problems.noting():
        raise ConfigError("a third")
    assert problems.messages == [
        "[train] epochs must be greater than 0, got 0",
        "[train] log_every must be greater than 0, got 0",
        "a third",
    ]
    with pytest.raises(ConfigError, match=r"^3 settings are not valid:\n  \[train\] epochs"):
        problems.raise_any()
