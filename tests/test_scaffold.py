"""``sslplug new-plugin`` writes a package that installs, is listed, and passes its own test."""

from __future__ import annotations

import pytest

from sslplug.cli import main

from .conftest import ThrowawayVenv


@pytest.mark.slow  # a pip install and two subprocesses
def test_new_plugin_installs_lists_and_passes_its_own_test(
    plugin_venv: ThrowawayVenv, tmp_path, capsys
):
    assert main(["new-plugin", "cosine_loss", "--component", "loss", "--dir", str(tmp_path)]) == 0
    folder = tmp_path / "sslplug-cosine-loss"
    assert {p.name for p in folder.iterdir()} == {
        "pyproject.toml", "sslplug_cosine_loss.py", "tests", "README.md",
    }  # fmt: skip
    with plugin_venv.installed(folder, editable=True) as (installed,):
        assert ("cosine_loss", "sslplug-cosine-loss") in plugin_venv.entry_points()
        listing = plugin_venv.sslplug("list")
        assert listing.returncode == 0, listing.stderr[-2000:]
        row = next(line.split() for line in listing.stdout.splitlines() if "cosine_loss" in line)
        assert row[1:3] == ["sslplug-cosine-loss", "0.1.0"]
        assert row[3:8] == ["-", "-", "-", "x", "-"]
        own = plugin_venv.run(
            "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=installed
        )
        assert own.returncode == 0, own.stdout[-3000:]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["new-plugin", "My-Loss"], "plugin name 'My-Loss' must be lower case"),
        (["new-plugin", "class"], "plugin name 'class' must be lower case"),
        (["new-plugin", "vicreg"], "name 'vicreg' is taken by the installed plugin from sslplug"),
    ],
)
def test_bad_plugin_names_are_refused(args, pattern, tmp_path, capsys):
    assert main([*args, "--dir", str(tmp_path)]) == 2
    assert pattern in capsys.readouterr().err


def test_an_existing_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "sslplug-mine").mkdir()
    assert main(["new-plugin", "mine", "--dir", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_a_name_whose_module_exists_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "sslplug_shadowed.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["new-plugin", "shadowed", "--dir", str(tmp_path)]) == 2
    assert "would make a module 'sslplug_shadowed', and an installed module" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "sslplug-shadowed").exists()
