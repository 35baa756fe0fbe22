"""Checkpoint versions: a version 1 file loads as version 2 and resumes; an unknown version is
refused, naming it and the versions this sslplug reads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sslplug.checkpoint import VERSION, load_checkpoint, migrate, save_checkpoint
from sslplug.cli import main
from sslplug.errors import CheckpointError

# what version 1 files written before these keys were saved lack; the engine once filled them in
_ADDED_BY_VERSION_2 = (
    "views",
    "baseline",
    "init_rng",
    "rng_per_rank",
    "epoch_loss_sum",
    "steps_per_epoch",
    "batch_size",
)


def _as_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the oldest layout version 1 had: without the keys added since."""
    old = {key: value for key, value in state.items() if key not in _ADDED_BY_VERSION_2}
    return {**old, "version": 1}


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def test_version_1_reads_as_version_2_with_what_it_lacked_filled_in(tmp_path):
    settings = {"train": {"batch_size": 32, "epochs": 3}}
    state = {"epoch": 2, "step": 8, "settings": settings, "knn_baseline": 12.5, "history": []}
    path = save_checkpoint({**state, "version": 1}, tmp_path / "last.pt")
    read = load_checkpoint(path)
    assert read["version"] == VERSION == 2
    assert read["steps_per_epoch"] == 4  # 8 steps in 2 epochs, saved at the end of an epoch
    assert read["batch_size"] == 32
    assert read["baseline"] == {"knn_top1": 12.5}
    assert read["views"] is None and read["init_rng"] is None
    assert read["epoch_loss_sum"] == 0.0 and read["rng_per_rank"] == []

    # inside an epoch the step and the epoch do not tell the steps of an epoch
    inside = migrate({**state, "version": 1, "step": 9, "epoch_loss_sum": 3.0})
    assert inside["steps_per_epoch"] is None and inside["epoch_loss_sum"] == 3.0
    assert migrate(read) == read  # version 2 is left as it is


@pytest.mark.parametrize("version", [3, 99, "2"])
def test_a_checkpoint_of_an_unknown_version_is_refused_naming_both(tmp_path, version):
    path = save_checkpoint({"epoch": 1, "version": version}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert f"has checkpoint version {version!r}; this sslplug reads versions 1 and 2" in message
    newer = "a newer sslplug wrote it: upgrade sslplug to read it"
    assert (newer in message) == isinstance(version, int)


def test_a_version_1_checkpoint_resumes_as_its_version_2_would(fast_args, tmp_path):
    first = tmp_path / "run"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    old = tmp_path / "old"
    shutil.copytree(first, old)
    written = torch.load(first / "last.pt", weights_only=True)
    assert written["version"] == 2
    torch.save(_as_version_1(written), old / "last.pt")  # as an earlier sslplug wrote it

    for run in (first, old):
        assert main(["run", "--resume", str(run), "--epochs", "2"]) == 0
    new_state, old_state = load_checkpoint(first), load_checkpoint(old)
    assert (old_state["epoch"], old_state["step"]) == (new_state["epoch"], new_state["step"])
    assert old_state["version"] == 2 and old_state["steps_per_epoch"] == 2
    for key, weights in new_state["encoder"].items():
        assert torch.equal(old_state["encoder"][key], weights), key
    assert old_state["history"][-1]["loss"] == new_state["history"][-1]["loss"]
    assert _knn(old) == _knn(first)


def _knn(run: Path) -> float:
    return load_checkpoint(run)["history"][-1]["knn_top1"]
