"""Third-party plugins installed for real with pip: the VICReg example mixes with our methods;
broken distributions are reported by name and leave the other plugins usable."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import FAST, ThrowawayVenv

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"

pytestmark = pytest.mark.slow  # pip installs and a subprocess per command


@pytest.fixture(scope="module")
def examples(plugin_venv: ThrowawayVenv) -> Iterator[ThrowawayVenv]:
    """The throwaway environment with the VICReg and the broken examples installed."""
    with plugin_venv.installed(EXAMPLES / "sslplug-vicreg-loss", EXAMPLES / "sslplug-broken"):
        yield plugin_venv


def _fast_run(shapes_folder: Path, out: Path, *args: str) -> list[str]:
    command = ["run", "--data", str(shapes_folder), "--epochs", "1", "--out", str(out), *args]
    for item in [
        *FAST,
        "train.max_steps_per_epoch=2",
        "knn.baseline=false",
        "health.baseline=false",
    ]:
        command += ["--set", item]
    return command


def test_the_examples_are_seen_in_the_throwaway_environment_only(examples):
    assert {("vicreg_loss", "sslplug-vicreg-loss"), ("broken_type", "sslplug-broken")} <= (
        examples.entry_points()
    )
    here = importlib.metadata.entry_points(group="sslplug")
    assert "vicreg_loss" not in here.names and "broken_type" not in here.names


def test_installed_vicreg_is_listed_and_mixes_with_builtin_encoders(
    examples, shapes_folder, tmp_path
):
    listing = examples.sslplug("list")
    assert listing.returncode == 0
    vicreg = next(
        line.split() for line in listing.stdout.splitlines() if line.startswith("vicreg_loss ")
    )
    assert vicreg[1:3] == ["sslplug-vicreg-loss", "0.1.0"]
    assert vicreg[3:8] == ["-", "-", "-", "x", "-"]  # only a loss
    done = examples.sslplug(
        *_fast_run(shapes_folder, tmp_path / "run", "--plugin", "simclr", "--loss", "vicreg_loss")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["components"]["loss"] == "vicreg_loss"
    assert summary["components"]["encoder"] == "simclr"


def test_broken_distributions_are_named_and_the_rest_keeps_working(
    examples, shapes_folder, tmp_path
):
    listing = examples.sslplug("list")
    assert listing.returncode == 0
    out = listing.stdout
    assert (
        "plugin 'broken_import' (distribution sslplug-broken) was left out: import of "
        "'sslplug_broken_import' failed: ModuleNotFoundError" in out
    )
    assert "plugin 'broken_hookname' (distribution sslplug-broken) was left out:" in out
    assert "sslplug_los" in out
    byol = next(line.split() for line in out.splitlines() if line.startswith("byol "))
    assert byol[1] == "sslplug"  # the built-in keeps its name ...
    assert byol[-1] == "sslplug_methods.byol"
    # ... and the other claimant would be registered as sslplug-broken:byol, but its module is
    # the one already registered as broken_type, which pluggy registers once
    assert (
        "plugin 'sslplug-broken:byol' (distribution sslplug-broken) was left out: registration "
        "failed" in out
    )

    wrong_type = examples.sslplug(
        *_fast_run(shapes_folder, tmp_path / "bad", "--loss", "broken_type")
    )
    assert wrong_type.returncode == 2
    assert "plugin 'broken_type' returned str from sslplug_loss" in wrong_type.stderr

    strict = examples.sslplug("--strict-plugins", "list")
    assert strict.returncode == 2 and "broken" in strict.stderr

    fine = examples.sslplug(*_fast_run(shapes_folder, tmp_path / "ok", "--plugin", "byol"))
    assert fine.returncode == 0, fine.stderr[-2000:]
