"""The training loop end to end: what a run leaves, resume, and bad checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import sslplug
from sslplug.checkpoint import load_checkpoint, save_checkpoint
from sslplug.cli import main
from sslplug.errors import CheckpointError


def test_short_run_leaves_settings_checkpoint_logs_and_summary(fast_args, tmp_path, capsys):
    assert main(fast_args) == 0  # with the progress bar switched off (conftest's FAST)
    # the epoch lines are the core's report: they stay without the bar
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("epoch ")]
    assert [x.split(":")[0] for x in lines] == ["epoch 1/2", "epoch 2/2"]
    assert ", kNN top-1 " in lines[0] and ", rank " in lines[0] and ", spread " in lines[0]
    run = tmp_path / "run"
    for name in ("settings.toml", "last.pt", "summary.json", "views.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4
    assert summary["components"]["loss"] == "byol"
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["knn_top1_random_init"] <= 100
    assert math.isfinite(summary["final_loss"])
    assert 0 <= summary["data_wait_share_median"] < 1
    state = load_checkpoint(run)
    assert state["epoch"] == 2 and state["step"] == 4
    assert state["target_update"] is not None and state["optimizer"]["state"]
    saved = (run / "settings.toml").read_text()
    assert 'target_update = "byol"' in saved
    assert "[knn]\nk = 10\n" in saved and "[health]\n" in saved  # the monitors' sections


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["encoder"]


class KilledAfterFirstEpoch:
    """A lifecycle plugin that interrupts the run once the first epoch is saved."""

    @sslplug.hookimpl
    def sslplug_epoch_end(self, epoch: int) -> None:
        raise KeyboardInterrupt


@pytest.mark.slow  # three training runs
def test_resume_after_a_kill_continues_exactly(fast_args, tmp_path, with_plugin):
    assert main(_with(fast_args, "--out", str(tmp_path / "full"))) == 0
    with with_plugin(KilledAfterFirstEpoch(), "killer"):
        assert main(_with(fast_args, "--out", str(tmp_path / "half"))) == 130
    assert load_checkpoint(tmp_path / "half")["epoch"] == 1
    assert main(["run", "--resume", str(tmp_path / "half")]) == 0

    resumed, straight = _final_weights(tmp_path / "half"), _final_weights(tmp_path / "full")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)
    a = json.loads((tmp_path / "half" / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    assert a["knn_top1"] == b["knn_top1"]


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no settings.toml there" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"not a checkpoint at all", "not a readable sslplug checkpoint"),
        ("truncated", "not a readable sslplug checkpoint"),
        ("foreign", "not an sslplug checkpoint"),
    ],
)
def test_corrupt_or_foreign_checkpoint_is_refused(fast_args, tmp_path, content, pattern, capsys):
    assert main(_with(fast_args, "--epochs", "1")) == 0
    path = tmp_path / "run" / "last.pt"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    assert main(["run", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    assert pattern in capsys.readouterr().err


def test_checkpoint_from_another_backbone_is_refused(fast_args, tmp_path, capsys):
    assert main(_with(fast_args, "--epochs", "1")) == 0
    settings = tmp_path / "run" / "settings.toml"
    settings.write_text(settings.read_text().replace('backbone = "small"', 'backbone = "resnet18"'))
    assert main(["run", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    assert "does not match this run's model (backbone 'resnet18')" in capsys.readouterr().err


def test_checkpoint_load_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "sslplug-checkpoint", "version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable sslplug checkpoint"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_lifecycle_hooks_and_a_mixed_in_augmentation_during_a_real_run(
    registry, shapes_folder, tmp_path
):
    import types

    import kornia.augmentation as K
    from torch import nn

    import sslplug
    from sslplug.config import load_config
    from sslplug.engine import train

    from .conftest import FAST

    calls: list[tuple[str, object]] = []
    plugin = types.ModuleType("listener")

    @sslplug.hookimpl
    def sslplug_augmentation(run):
        flip_only = nn.Sequential(
            K.RandomHorizontalFlip(p=0.5), K.Normalize(sslplug.augment.MEAN, sslplug.augment.STD)
        )
        return (flip_only, flip_only)

    @sslplug.hookimpl
    def sslplug_target_update():
        return None  # this plugin has no target network

    @sslplug.hookimpl
    def sslplug_run_start(run):
        calls.append(("start", dict(run.components)))

    @sslplug.hookimpl
    def sslplug_step_end(step, metrics):
        calls.append(("step", (step, sorted(metrics))))

    @sslplug.hookimpl
    def sslplug_epoch_end(epoch, metrics):
        calls.append(("epoch", epoch))

    @sslplug.hookimpl
    def sslplug_run_end(summary):
        calls.append(("end", summary["epochs"]))

    for fn in (
        sslplug_augmentation,
        sslplug_target_update,
        sslplug_run_start,
        sslplug_step_end,
        sslplug_epoch_end,
        sslplug_run_end,
    ):
        setattr(plugin, fn.__name__, fn)
    assert registry.register(plugin, "listener")
    # its augmentation comes with the default views
    assert registry.provides("listener") == ("augmentation", "views", "target_update")

    def one_epoch(out: str, choice: str) -> dict:
        config = load_config(
            assignments=[
                *FAST,
                f"data.name={shapes_folder}",
                "train.epochs=1",
                f"train.out={tmp_path / out}",
                choice,
            ],
            plugin_settings=registry.settings_classes(),
        )
        return train(config, registry)

    summary = one_epoch("run", "components.augmentation=listener")
    assert summary["components"]["augmentation"] == "listener"
    assert summary["components"]["target_update"] == "byol"
    kinds = [kind for kind, _ in calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 1
    step, keys = next(value for kind, value in calls if kind == "step")
    assert step == 1 and {"loss", "lr", "images_per_second", "tau"} <= set(keys)

    # the same plugin chosen for the target update gives a run without a target network
    calls.clear()
    summary = one_epoch("run2", "components.target_update=listener")
    assert summary["components"]["target_update"] == "none"


def test_non_finite_loss_stops_with_the_step_and_the_last_checkpoint(
    registry, shapes_folder, tmp_path
):
    import types

    from torch import nn

    import sslplug
    from sslplug.config import load_config
    from sslplug.engine import NonFiniteLossError, train

    from .conftest import FAST

    class NanLoss(nn.Module):
        def forward(self, outputs, views, target):
            return outputs.projections[0].sum() * float("nan"), {}

    @sslplug.hookimpl
    def sslplug_loss():
        return NanLoss()

    plugin = types.ModuleType("nanloss")
    plugin.sslplug_loss = sslplug_loss
    assert registry.register(plugin, "nanloss")
    config = load_config(
        assignments=[
            *FAST,
            f"data.name={shapes_folder}",
            f"train.out={tmp_path / 'run'}",
            "components.loss=nanloss",
        ],
        plugin_settings=registry.settings_classes(),
    )
    with pytest.raises(
        NonFiniteLossError, match=r"the loss is nan at step 1 \(epoch 1\).*last\.pt"
    ):
        train(config, registry)
