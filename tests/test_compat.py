"""Plugins written against sslplug 0.1 still install, train and resume with today's core.

The plugins are frozen copies in ``tests/fixtures/compat`` (see its README): a failure here
means a change to the core broke published plugins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ThrowawayVenv

FROZEN = Path(__file__).parent / "fixtures" / "compat"

# a few steps on the default data, no evaluation beyond the final kNN
SHORT = [
    "--batch-size", "32", "--no-progress",
    "--set", "train.max_steps_per_epoch=3",
    "--set", "eval.baseline=false",
    "--set", "eval.every=0",
    "--set", "eval.embedding_samples=0",
]  # fmt: skip


@pytest.mark.slow  # a pip install and two training runs in subprocesses
@pytest.mark.parametrize(
    ("folder", "plugin", "choice"),
    [
        ("sslplug-vicreg-0.1", "vicreg_v01", ["--plugin", "simclr", "--loss", "vicreg_v01"]),
        ("sslplug-scaffold-v01", "scaffold_v01", ["--plugin", "scaffold_v01"]),
        (
            "sslplug-multicrop-v01",
            "multicrop_v01",
            ["--plugin", "multicrop_v01", "--encoder", "simclr"],
        ),
    ],
    ids=["vicreg-0.1", "new-plugin-0.1", "free-capability-0.1"],
)
def test_a_plugin_of_version_0_1_trains_and_resumes(
    plugin_venv: ThrowawayVenv, tmp_path, folder, plugin, choice
):
    out = tmp_path / "run"
    with plugin_venv.installed(FROZEN / folder):
        assert plugin in {name for name, _ in plugin_venv.entry_points()}
        first = plugin_venv.sslplug("run", *choice, "--epochs", "2", "--out", str(out), *SHORT)
        assert first.returncode == 0, first.stderr[-3000:]
        if plugin == "multicrop_v01":  # its capability is registered on its behalf, with advice
            assert "declares the capability 'multi_crop', which no plugin registers" in first.stderr
            assert "sslplug_capabilities" in first.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert plugin in summary["components"].values()
        assert (summary["epochs"], summary["steps"]) == (2, 6)

        resumed = plugin_venv.sslplug("run", "--resume", str(out), "--epochs", "3", *SHORT)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["epochs"], summary["steps"]) == (3, 9)
        assert plugin in summary["components"].values()
