"""``torchrun --nproc-per-node 2 -m sslplug run``: two CPU ranks with gloo, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslplug.checkpoint import load_checkpoint

from .conftest import FAST

pytestmark = pytest.mark.slow  # torchrun with two gloo ranks


def _torchrun(shapes_folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += ["-m", "sslplug", "run", "--data", str(shapes_folder), "--epochs", "2"]
    args += ["--out", str(out), "--device", "cpu", *extra]
    for item in FAST:
        args += ["--set", item]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_train_log_once_and_resume_from_the_same_state(shapes_folder, tmp_path):
    done = _torchrun(shapes_folder, tmp_path / "a", "--plugin", "simclr")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4  # 80 images, global batch 32
    assert len(list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = load_checkpoint(tmp_path / "a")
    assert len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])

    again = _torchrun(shapes_folder, tmp_path / "b", "--plugin", "simclr")
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for key, value in first["encoder"].items():
        torch.testing.assert_close(second["encoder"][key], value, msg=key)  # same seed, same run


def test_byol_on_two_ranks_keeps_one_target_network(shapes_folder, tmp_path):
    # the engine compares the encoder and the EMA target across ranks after every epoch
    done = _torchrun(shapes_folder, tmp_path / "byol", "--plugin", "byol")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(tmp_path / "byol")["target_update"] is not None


@pytest.mark.parametrize("plugin", ["dino", "mae", "ijepa"])
def test_vit_methods_train_on_two_ranks(shapes_folder, tmp_path, plugin):
    done = _torchrun(
        shapes_folder,
        tmp_path / plugin,
        "--plugin",
        plugin,
        "--backbone",
        "vit_micro",
        "--set",
        "knn.baseline=false",
        "--set",
        "health.baseline=false",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / plugin / "summary.json").read_text())
    assert summary["backbone"] == "vit_micro" and summary["steps"] == 4
