"""Loading a finished run: settings saved while other plugins were installed still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslplug.assembly import assemble
from sslplug.checkpoint import save_checkpoint
from sslplug.cli import main
from sslplug.config import load_config
from sslplug.errors import ConfigError
from sslplug.plugins import PluginRegistry
from sslplug.pretrained import load_run


def _checkpoint(registry: PluginRegistry, path: Path, saved_loss: str = "byol") -> Path:
    """A BYOL run's checkpoint whose settings also hold [data2vec], a plugin not installed here."""
    config = load_config(None, (), registry.settings_classes())
    built = assemble(config, registry, image_size=32, device=torch.device("cpu"), train=False)
    settings = config.to_dict()
    settings["data2vec"] = {"teacher_temperature": 0.04}
    settings["components"]["loss"] = saved_loss
    state = {
        "settings": settings,
        "encoder": built.parts.encoder.state_dict(),
        "components": {**built.context.components, "loss": saved_loss},
        "image_size": 32,
        "epoch": 1,
    }
    return save_checkpoint(state, path)


def test_a_run_saved_with_a_section_of_an_uninstalled_plugin_loads_and_exports(
    registry, tmp_path, caplog
):
    checkpoint = _checkpoint(registry, tmp_path / "last.pt")
    run = load_run(checkpoint, registry)
    assert "data2vec" not in run.config.plugins and run.components["loss"] == "byol"
    assert "leaving out [data2vec]" in caplog.text
    assert main(["export", str(checkpoint), str(tmp_path / "backbone.pt")]) == 0
    note = json.loads((tmp_path / "backbone.json").read_text())
    # the note keeps the sections of the plugins the run used, not of all installed ones
    assert "byol" in note["settings"] and "data2vec" not in note["settings"]
    assert "simclr" not in note["settings"]


def test_a_run_whose_components_need_an_uninstalled_plugin_is_an_error(registry, tmp_path):
    checkpoint = _checkpoint(registry, tmp_path / "last.pt", saved_loss="data2vec")
    expected = "unknown settings section in the saved settings 'data2vec'"
    with pytest.raises(ConfigError, match=expected):
        load_run(checkpoint, registry)
