"""A plugin name means one piece of code: built-in methods cannot be shadowed, and a third
party's plugin whose name is taken stays usable under ``DISTRIBUTION:NAME``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from sslplug_methods import METHODS

from sslplug.config import COMPONENTS
from sslplug.plugins import PluginRegistry, qualified_name

from .conftest import ThrowawayVenv, fake_distribution

CLASH = Path(__file__).parent / "fixtures" / "clash"

LOSS = """
import sslplug
import torch.nn.functional as F

class Loss(sslplug.Loss):
    requires = frozenset({"two_views", "projection"})

    def forward(self, outputs, views, target):
        z1, z2 = outputs.projections[:2]
        return sslplug.LossResult(-F.cosine_similarity(z1, z2, dim=-1).mean(), {})

@sslplug.hookimpl
def sslplug_loss():
    return Loss()
"""


def test_a_qualified_name_is_the_normalised_distribution_then_the_name():
    assert qualified_name("Sslplug_Dino.Plus", "dino") == "sslplug-dino-plus:dino"
    assert qualified_name(None, "dino") == "unknown:dino"


def test_every_built_in_runs_from_the_methods_package(registry):
    for name in METHODS:
        assert registry.module_of(name) == f"sslplug_methods.{name}", name
        assert registry.origin(name).startswith(f"sslplug_methods.{name} (distribution sslplug ")


def test_the_old_module_names_import_the_package_modules_with_a_deprecation_warning():
    import sslplug_methods.dino

    with pytest.warns(DeprecationWarning, match=r"'sslplug_swav' is now 'sslplug_methods.swav'"):
        import sslplug_swav  # noqa: F401  (first import in this process runs the alias)
    import sys

    assert sys.modules["sslplug_swav"] is sys.modules["sslplug_methods.swav"]
    assert sslplug_methods.dino.__name__ == "sslplug_methods.dino"


def test_a_third_party_claiming_a_built_in_name_gets_its_qualified_name(tmp_path, monkeypatch):
    # it claims a built-in method's name and one of the core's lifecycle plugins' names
    plugins = {"dino": LOSS, "knn": LOSS}
    monkeypatch.syspath_prepend(fake_distribution(tmp_path, "DINO_plus", plugins))
    registry = PluginRegistry()
    registry.load_entry_points()
    assert registry.failures == []
    assert registry.module_of("dino") == "sslplug_methods.dino"
    assert registry.module_of("dino-plus:dino") == "dino_plugin"
    assert registry.provides("dino-plus:dino") == ("loss",)
    assert registry.module_of("dino-plus:knn") == "knn_plugin"
    assert "knn" in registry.internal_names() and "knn" not in registry.names()
    info = {entry.name: entry for entry in registry.info()}
    assert info["dino-plus:dino"].distribution == "DINO_plus"
    assert info["dino"].distribution == "sslplug"


@pytest.mark.slow  # a pip install and two short training runs in subprocesses
def test_a_real_clash_installed_by_pip_runs_the_built_in_by_name(
    plugin_venv: ThrowawayVenv, tmp_path
):
    short = ["--epochs", "1", "--batch-size", "32", "--disable", "progress"]
    short += [
        "--set",
        "train.max_steps_per_epoch=2",
        "--set",
        "knn.baseline=false",
        "--set",
        "health.baseline=false",
    ]
    short += [
        "--set",
        "knn.every=0",
        "--set",
        "health.every=0",
        "--set",
        "tensorboard.embedding_samples=0",
    ]
    shadow, plus = CLASH / "sslplug-byol-shadow", CLASH / "sslplug-dino-plus"
    with plugin_venv.installed(shadow, plus):
        # the module named like the built-in BYOL's old module is the third party's now ...
        which = plugin_venv.run("-c", "import sslplug_byol; print(sslplug_byol.__doc__)")
        assert which.stdout.startswith("A third party's loss"), which.stderr[-2000:]
        listing = plugin_venv.sslplug("list")
        assert listing.returncode == 0, listing.stderr[-2000:]
        rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines() if line}
        # ... and `sslplug list` says which code runs under each name
        assert rows["byol"][1] == "sslplug" and rows["byol"][-1] == "sslplug_methods.byol"
        assert rows["dino"][1] == "sslplug" and rows["dino"][-1] == "sslplug_methods.dino"
        assert rows["sslplug-dino-plus:dino"][-1] == "sslplug_dino_plus"
        assert rows["byol_shadow"][-1] == "sslplug_byol"
        assert "not loaded" not in listing.stdout

        runs = {
            "built-in": ["--plugin", "byol"],
            "qualified": ["--plugin", "simclr", "--loss", "sslplug-dino-plus:dino"],
        }
        for kind, choice in runs.items():
            out = tmp_path / kind
            done = plugin_venv.sslplug("run", *choice, "--out", str(out), *short)
            assert done.returncode == 0, f"{kind}: {done.stderr[-3000:]}"
            summary = json.loads((out / "summary.json").read_text())
            loss_state = torch.load(out / "last.pt", weights_only=True)["loss"]
            code = _code_of_components(out / "settings.toml")
            if kind == "built-in":
                assert set(summary["components"].values()) == {"byol"}
                assert code["loss"].startswith("sslplug_methods.byol (distribution sslplug ")
                assert not any("marker" in key for key in loss_state)
            else:
                assert summary["components"]["loss"] == "sslplug-dino-plus:dino"
                assert code["loss"] == "sslplug_dino_plus (distribution sslplug-dino-plus 1.0.0)"
                assert set(loss_state) == {"dino_plus_marker"}


def _code_of_components(settings: Path) -> dict[str, str]:
    """The comment at the top of a run's settings.toml naming the code behind each component."""
    lines = [
        line.removeprefix("#").strip()
        for line in settings.read_text().splitlines()
        if line.startswith("#")
    ]
    pairs = [line.split(" = ", 1) for line in lines if " = " in line and line[:1].isalpha()]
    return {key: value for key, value in pairs if key in COMPONENTS}


def test_no_warning_is_raised_by_importing_the_methods_package():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import sslplug_methods.byol  # noqa: F401
