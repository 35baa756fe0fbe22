"""The command line: list, help, and bad input answered with a message instead of a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import tomli_w

from sslplug.commands import build_parser, main


def test_list_shows_byol_with_distribution_and_components(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["plugin", "distribution", "version"]
    byol = next(row.split() for row in rows if row.startswith("byol"))
    assert byol[1] == "sslplug" and byol[3:8] == ["x"] * 5


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (
            ["run", "--plugin", "simclr-typo"],
            "unknown plugin 'simclr-typo' \\(--plugin simclr-typo\\)\\. Did you mean 'simclr'\\? "
            "Installed plugins: .*byol",
        ),
        (["run", "--set", "byol.tau=0.9"], "unknown key in \\[byol\\] 'tau'"),
        (["run", "--set", "train.batch_size=big"], "train.batch_size must be int, got 'big'"),
        (["run", "--backbone", "vgg"], "model.backbone 'vgg' is not valid; valid: small, resnet18"),
        (["run", "--device", "tpu"], "train.device 'tpu' is not a device"),
        (["run", "--data", "/does/not/exist"], "neither a built-in data set"),
        (["run", "--config", "/does/not/exist.toml"], "does not exist"),
    ],
)
def test_bad_input_is_a_message_and_exit_code_2(args, pattern, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslplug: error: ")
    assert __import__("re").search(pattern, err), err


def test_batch_larger_than_the_data_is_refused(shapes_folder, capsys):
    assert (
        main(
            ["run", "--data", str(shapes_folder), "--batch-size", "1000", "--set", "data.workers=0"]
        )
        == 2
    )
    assert "larger than the 80 training images" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess
def test_console_script_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "sslplug", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--plugin", "--loss", "--target-update", "--set", "--epochs", "--resume", "--out"):
        assert flag in result.stdout


def test_info_shows_components_and_settings_with_defaults(capsys):
    assert main(["info", "simclr"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("simclr: from sslplug")
    assert "components: augmentation, views, encoder, loss\n" in out  # no target network
    assert "temperature = 0.5  (float)" in out


def test_info_of_an_unknown_plugin_lists_the_installed(capsys):
    assert main(["info", "mocov3"]) == 2
    err = capsys.readouterr().err
    assert "no plugin named 'mocov3'. Did you mean 'moco_v3'? Installed: barlow_twins, byol" in err
    assert "the core's lifecycle plugins: tensorboard, progress, knn, health, view_grid" in err


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_subcommand_is_covered_by_the_help_test():
    assert {"run", "eval", "finetune", "export", "bench"} <= set(_subcommands())


@pytest.mark.parametrize(
    "argv", [["--help"]] + [[cmd, "--help"] for cmd in _subcommands()], ids=" ".join
)
def test_help_of_every_command_prints_usage_and_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sslplug"), out
    assert argv[0] in out


class _Stop(Exception):
    """Raised by the stand-in for training, once it has the settings the command built."""


def test_resume_reads_the_run_settings_without_the_tomllib_module(tmp_path, monkeypatch):
    # Python 3.10 has no tomllib; the command must read settings.toml through config's import.
    import sslplug.engine
    from sslplug.config import load_config
    from sslplug.plugins import PluginRegistry

    registry = PluginRegistry()
    registry.load_entry_points()
    saved = load_config(None, ["train.epochs=7", "optim.name=sgd"], registry.settings_classes())
    (tmp_path / "settings.toml").write_text(tomli_w.dumps(saved.to_dict()))
    seen = []

    def train(config, registry, resume=None, ignore_collapse=False):
        seen.append((config, resume))
        raise _Stop

    monkeypatch.setattr(sslplug.engine, "train", train)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails
    with pytest.raises(_Stop):
        main(["run", "--resume", str(tmp_path), "--epochs", "9"])
    (config, resume), = seen
    assert resume == tmp_path
    assert (config.optim.name, config.train.epochs) == ("sgd", 9)


def test_no_progress_is_deprecated_and_the_same_as_disable_progress(tmp_path, monkeypatch, capsys):
    """--no-progress still works: it says once that --disable progress replaces it, then
    builds the settings --disable progress builds."""
    import sslplug.engine

    seen = []

    def train(config, registry, resume=None, ignore_collapse=False, overwrite=False):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(sslplug.engine, "train", train)
    for flags in (["--no-progress"], ["--disable", "progress"]):
        with pytest.raises(_Stop):
            main(["run", "--out", str(tmp_path / "run"), *flags])
    deprecated, disabled = seen
    assert deprecated.to_dict() == disabled.to_dict()
    assert deprecated.train.disable == ("progress",)
    err = capsys.readouterr().err
    assert err == (
        "sslplug: warning: --no-progress is deprecated and will be removed; use "
        "--disable progress instead\n"
    )


def test_settings_under_their_old_names_build_the_same_run_with_a_warning_line_each(
    tmp_path, monkeypatch, capsys
):
    """``--set eval.knn_k`` and ``--set train.progress=false`` still work: each says once what
    replaces it, then the settings are those of the new names."""
    import sslplug.engine

    seen = []

    def train(config, registry, resume=None, ignore_collapse=False, overwrite=False):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(sslplug.engine, "train", train)
    out = ["run", "--out", str(tmp_path / "run")]
    for settings in (
        ["eval.knn_k=10", "eval.every=1", "train.progress=false"],
        ["knn.k=10", "knn.every=1", "health.every=1", "train.disable=['progress']"],
    ):
        with pytest.raises(_Stop):
            main([*out, *(item for setting in settings for item in ("--set", setting))])
    old, new = seen
    assert old.to_dict() == new.to_dict() and old.plugins["knn"].k == 10
    assert capsys.readouterr().err.splitlines() == [
        "sslplug: warning: --set eval.knn_k is deprecated and will be removed; use knn.k instead",
        "sslplug: warning: --set eval.every is deprecated and will be removed; use knn.every "
        "and health.every instead",
        "sslplug: warning: --set train.progress is deprecated and will be removed; use "
        "--disable progress instead",
    ]
