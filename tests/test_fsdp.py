"""``train.strategy = "fsdp"`` (``sslplug.fsdp``): what it refuses, and two gloo ranks on the CPU
under ``torchrun`` against DDP, a single process, and a resumed run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sslplug.assembly import assemble
from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.errors import ConfigError
from sslplug.fsdp import check_strategy, full_state, shard

from .conftest import FAST
from .harness import assert_same_checkpoints, config_of

# BYOL on vit_micro, 2 epochs of 2 steps (80 images, global batch 32), without the monitors
# that read the encoder on rank 0 (check_strategy refuses them under fsdp)
SETTINGS = [
    *FAST,
    "model.backbone=vit_micro",
    "train.channels_last=false",
    "train.precision=fp32",
    "train.disable=['progress', 'knn', 'health']",
    "tensorboard.embedding_samples=0",
]


def _torchrun(shapes_folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += ["-m", "sslplug", "run", "--data", str(shapes_folder), "--epochs", "2"]
    args += ["--out", str(out), "--device", "cpu", "--plugin", "byol"]
    for item in [*SETTINGS, *extra]:
        args += ["--set", item]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same BYOL run on two ranks under fsdp and under ddp."""
    root = tmp_path_factory.mktemp("fsdp")
    for strategy in ("fsdp", "ddp"):
        _torchrun(shapes_folder, root / strategy, f"train.strategy={strategy}")
    return {strategy: root / strategy for strategy in ("fsdp", "ddp")}


@pytest.mark.slow  # two torchrun runs of two gloo ranks
def test_two_ranks_sharded_train_as_ddp_does(runs):
    sharded, replicated = (load_checkpoint(runs[s]) for s in ("fsdp", "ddp"))
    assert sharded["settings"]["train"]["strategy"] == "fsdp"
    losses = [[epoch["loss"] for epoch in state["history"]] for state in (sharded, replicated)]
    assert len(losses[0]) == 2
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for part in ("encoder", "target_update"):
        assert sharded[part].keys() == replicated[part].keys()
        for key, value in replicated[part].items():  # whole tensors, as DDP writes them
            torch.testing.assert_close(sharded[part][key], value, rtol=0, atol=1e-6, msg=key)
    for index, moments in replicated["optimizer"]["state"].items():  # whole, as DDP's
        for key, value in moments.items():
            got = sharded["optimizer"]["state"][index][key]
            torch.testing.assert_close(got, value, rtol=0, atol=1e-6, msg=f"{index}.{key}")


@pytest.mark.slow  # uses the torchrun runs, and a resume in one process
def test_a_sharded_run_exports_and_resumes_in_one_process(runs, tmp_path):
    for strategy in ("fsdp", "ddp"):
        assert main(["export", str(runs[strategy]), str(tmp_path / f"{strategy}.pt")]) == 0
    sharded, replicated = (torch.load(tmp_path / f"{s}.pt") for s in ("fsdp", "ddp"))
    assert sharded.keys() == replicated.keys() and sharded
    for key, value in replicated.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "fsdp.json").read_text())["backbone"] == "vit_micro"
    resumed = shutil.copytree(runs["fsdp"], tmp_path / "resumed")
    assert main(["run", "--resume", str(resumed), "--epochs", "3", "--device", "cpu"]) == 0
    assert json.loads((resumed / "summary.json").read_text())["epochs"] == 3


@pytest.mark.slow  # two more torchrun runs
def test_a_sharded_run_stopped_after_epoch_1_resumes_bit_exactly(runs, shapes_folder, tmp_path):
    out = tmp_path / "stopped"
    # every epoch takes longer than 0.06 s: the session ends after epoch 1, checkpointed
    _torchrun(shapes_folder, out, "train.strategy=fsdp", "train.max_minutes=0.001")
    assert load_checkpoint(out)["epoch"] == 1
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args += ["-m", "sslplug", "run", "--resume", str(out), "--set", "train.max_minutes=0"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*args, "--device", "cpu"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_checkpoints(runs["fsdp"], out)  # the optimiser's moments included


def test_an_unknown_strategy_is_refused_naming_the_valid_ones(registry):
    with pytest.raises(ConfigError, match=r"train\.strategy") as caught:
        config_of(registry, ["train.strategy=nope"])
    assert "'nope'" in str(caught.value)
    assert "ddp" in str(caught.value) and "fsdp" in str(caught.value)


def test_fsdp_refuses_the_monitors_that_read_the_encoder_on_rank_0(registry):
    config = config_of(registry, ["train.strategy=fsdp"])
    with pytest.raises(ConfigError) as caught:
        check_strategy(config, world=2)
    message = str(caught.value)
    assert "--disable knn --disable health" in message
    assert "--set tensorboard.embedding_samples=0" in message
    assert "--set train.strategy=ddp" in message
    config = config_of(
        registry, ["train.strategy=fsdp", "train.disable=['knn']", "train.compile=true"]
    )
    with pytest.raises(ConfigError) as caught:
        check_strategy(config, world=2)
    assert "--disable health" in str(caught.value) and "knn" not in str(caught.value)
    assert "--set train.compile=false" in str(caught.value)


def test_fsdp_says_what_it_changes_and_ddp_says_nothing(registry):
    monitors_off = ["train.disable=['knn', 'health']", "tensorboard.embedding_samples=0"]
    config = config_of(registry, ["train.strategy=fsdp", *monitors_off])
    (note,) = check_strategy(config, world=2)
    assert "train.channels_last is ignored" in note
    config = config_of(
        registry, ["train.strategy=fsdp", "train.channels_last=false", *monitors_off]
    )
    assert check_strategy(config, world=2) == []
    (note,) = check_strategy(config_of(registry, ["train.strategy=fsdp"]), world=1)
    assert "one process: nothing to shard" in note
    assert check_strategy(config_of(registry, []), world=2) == []  # ddp


def test_fsdp_refuses_a_loss_with_trainable_weights(registry):
    config = config_of(registry, ["components.plugin=swav", "train.device=cpu"])
    parts = assemble(config, registry, image_size=32, device=torch.device("cpu"), train=False)
    with pytest.raises(ConfigError, match=r"SwAVLoss.*--set train.strategy=ddp"):
        shard(parts.parts, torch.device("cpu"))


def test_full_state_gathers_shards_and_leaves_the_state_as_it_was(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        whole = torch.arange(6.0).view(3, 2)
        sharded = distribute_tensor(whole, init_device_mesh("cpu", (1,)), [Shard(0)])
        moments = {"exp_avg": sharded, "step": torch.tensor(3.0)}
        state = OrderedDict(w=sharded, optimizer={"state": {0: moments}}, groups=[{"lr": 0.1}])
        state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
        gathered = full_state(state)
    finally:
        dist.destroy_process_group()
    assert type(gathered["w"]) is torch.Tensor and torch.equal(gathered["w"], whole)
    assert type(gathered["optimizer"]["state"][0]["exp_avg"]) is torch.Tensor
    assert gathered["groups"] == [{"lr": 0.1}]
    assert gathered._metadata == state._metadata  # type: ignore[attr-defined]
    assert moments["exp_avg"] is sharded  # a live optimiser's state is left as it was
