"""The run folder under faults, each injected for real: a second run on a folder that holds one
or is in use, a kill before the first checkpoint or during a checkpoint write, a resume that
would change the run, a file that cannot be written, a folder that cannot be made."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslplug.checkpoint import load_checkpoint, save_checkpoint, write_failure
from sslplug.cli import main
from sslplug.rundir import LOCK_FILE


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _resume(run: Path, *extra: str) -> list[str]:
    return ["run", "--resume", str(run), *extra]


def _events(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "tensorboard").glob("events.out.tfevents.*"))


# `sslplug run` in a child process with a lifecycle plugin that, at the end of step AT_STEP
# (1 unless told), does ACTION: kill the process with SIGKILL, or sleep while holding the run
# folder.
_CHILD = """
import os, signal, sys, time
import sslplug, sslplug.commands

class AtStep1:
    @sslplug.hookimpl
    def sslplug_step_end(self, step):
        if step == AT_STEP:
            ACTION

load = sslplug.commands._load_registry

def with_plugin(strict):
    registry = load(strict)
    registry.register(AtStep1(), "at_step_1")
    return registry

sslplug.commands._load_registry = with_plugin
sys.exit(sslplug.commands.main(sys.argv[1:]))
"""
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
SLEEP = "time.sleep(600)"


def _child(args: list[str], action: str, at_step: int = 1) -> subprocess.Popen:
    script = _CHILD.replace("ACTION", action).replace("AT_STEP", str(at_step))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for_step_1(child: subprocess.Popen, run: Path) -> str:
    """Wait until ``child`` sleeps at step 1 (its views.png written, its lock taken); return
    what its lock file says."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()[1][-3000:]
        holder = (run / LOCK_FILE).read_text() if (run / LOCK_FILE).is_file() else ""
        if holder and (run / "views.png").is_file():
            return holder
        time.sleep(0.2)
    raise AssertionError("the child never reached step 1")


def test_a_folder_holding_a_run_is_refused_and_overwrite_starts_it_over(
    fast_args, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("not a run")  # unrelated files are no obstacle
    args = _with(fast_args, "--epochs", "1")
    assert main(args) == 0
    before = {name: (run / name).read_bytes() for name in ("last.pt", "settings.toml")}
    events = _events(run)
    capsys.readouterr()

    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{str(run)!r} already holds a run (settings.toml, last.pt, summary.json)" in err
    assert f"continue it with `sslplug run --resume {run}`" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    assert _events(run) == events

    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed the earlier run's settings.toml, last.pt, summary.json" in err
    new_events = _events(run)
    assert len(new_events) == 1 and new_events != events  # one run's events, not two mixed
    assert "seed = 1" in (run / "settings.toml").read_text()
    assert load_checkpoint(run)["epoch"] == 1
    assert (run / "notes.txt").read_text() == "not a run"


def test_an_empty_existing_folder_is_fine_and_a_refused_run_leaves_no_folder(
    fast_args, tmp_path, capsys
):
    (tmp_path / "run").mkdir()
    assert main(_with(fast_args, "--epochs", "1")) == 0
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # let go at the end of the run

    new = tmp_path / "new" / "run"
    assert main([*_with(fast_args, "--out", str(new)), "--disable", "nonesuch"]) == 2
    assert "--disable 'nonesuch'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the folders the lock made are gone with it


@pytest.mark.slow  # two child processes
def test_a_second_run_on_a_folder_in_use_fails_at_once_naming_the_first(
    fast_args, tmp_path, run_cli
):
    run = tmp_path / "run"
    first = _child(fast_args, SLEEP)
    try:
        holder = _wait_for_step_1(first, run)
        assert holder.startswith(f"pid {first.pid} on ")
        second = run_cli(fast_args)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{str(run)!r} is in use by another sslplug command (pid {first.pid} on " in (
            second.stderr
        )
        assert "wait for it to end or stop it, or give another --out" in second.stderr
        assert "Traceback" not in second.stderr and "epoch 1/" not in second.stderr
        overwrite = run_cli([*fast_args, "--overwrite"])  # must not delete a live run's files
        assert overwrite.returncode == 2 and f"pid {first.pid}" in overwrite.stderr
        assert (run / "settings.toml").is_file() and (run / "views.png").is_file()
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    with open(run / LOCK_FILE) as handle:  # kill -9 let go of the lock
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _wait_for(child: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"the child never wrote {path}"
        time.sleep(0.2)


@pytest.mark.slow  # a run in a child process
def test_eval_and_finetune_on_a_folder_a_run_trains_in_are_refused_at_once_naming_it(
    fast_args, tmp_path, capsys
):
    run, training = tmp_path / "run", tmp_path / "training"
    assert main(_with(fast_args, "--epochs", "1")) == 0  # last.pt and summary.json: epoch 1
    summary = (run / "summary.json").read_bytes()
    # resumed for two more epochs, it sleeps in its first step (step 3), holding the folder
    sleep = f"open({str(training)!r}, 'w').close(); time.sleep(600)"
    first = _child(_resume(run, "--epochs", "3"), sleep, at_step=3)
    try:
        _wait_for(first, training)
        capsys.readouterr()
        for command in (["eval", str(run), "--labels", "2"], ["finetune", str(run / "last.pt")]):
            assert main(command) == 2
            out, err = capsys.readouterr()
            assert err.startswith(
                f"sslplug: error: the run folder {str(run)!r} is in use by another sslplug "
                f"command (pid {first.pid} on "
            ), err
            assert f"--resume {run} --epochs 3" in err  # the holder's command line
            assert f"then run `sslplug {command[0]}` again" in err
            assert out == "" and "Traceback" not in err  # nothing measured
            assert (run / "summary.json").read_bytes() == summary
        assert first.poll() is None  # the run trains on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert main(["eval", str(run), "--labels", "2"]) == 0  # kill -9 let go of the lock
    assert not (run / LOCK_FILE).exists()  # and eval let go of it when done


# `sslplug eval` in a child process whose probe sleeps, while it holds the run folder
_SLOW_EVAL = """
import sys, time
import sslplug.cli, sslplug.downstream

mark = sys.argv.pop(1)

def probe(*args, **kwargs):
    open(mark, "w").close()
    time.sleep(600)

sslplug.downstream.frozen_evaluation = probe
sys.exit(sslplug.cli.main(sys.argv[1:]))
"""


@pytest.mark.slow  # eval in a child process
def test_a_run_resumed_while_eval_works_in_its_folder_is_refused_naming_eval(
    fast_args, tmp_path, capsys
):
    run, evaluating = tmp_path / "run", tmp_path / "evaluating"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    before = load_checkpoint(run)["step"]
    capsys.readouterr()
    evaluation = subprocess.Popen(
        [sys.executable, "-c", _SLOW_EVAL, str(evaluating), "eval", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _wait_for(evaluation, evaluating)
        assert main(_resume(run, "--epochs", "2")) == 2
        err = capsys.readouterr().err
        assert f"is in use by another sslplug command (pid {evaluation.pid} on " in err
        assert f"eval {run}" in err and "wait for it to end or stop it" in err
    finally:
        evaluation.send_signal(signal.SIGKILL)
        evaluation.communicate()
    assert load_checkpoint(run)["step"] == before

@pytest.mark.slow  # three runs
def test_evaluations_recorded_in_summary_are_kept_when_the_run_is_resumed(
    fast_args, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    assert main(["eval", str(run), "--labels", "2"]) == 0
    assert main(["finetune", str(run), "--labels", "2", "--steps", "2"]) == 0
    recorded = json.loads((run / "summary.json").read_text())["evaluations"]
    assert {r["kind"] for r in recorded} == {"frozen", "health", "finetune"}
    assert {r["epoch"] for r in recorded} == {1}  # the checkpoint each one measured

    assert main(_resume(run, "--epochs", "2")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == recorded  # kept, beside the new end of the run
    assert summary["epochs"] == 2 and [h["epoch"] for h in summary["knn_history"]] == [1, 2]
    assert main(["eval", str(run), "--labels", "2"]) == 0
    evaluations = json.loads((run / "summary.json").read_text())["evaluations"]
    assert evaluations[: len(recorded)] == recorded and evaluations[-1]["epoch"] == 2

    (run / "summary.json").write_text("{not json")  # not sslplug's: refused before any work
    capsys.readouterr()
    assert main(_resume(run, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert f"cannot resume the run in {str(run)!r}: its summary.json cannot be read" in err
    assert "move that file aside" in err and "epoch 3/" not in err
    assert (run / "summary.json").read_text() == "{not json"
    assert load_checkpoint(run)["epoch"] == 2

    assert main([*_with(fast_args, "--epochs", "1"), "--overwrite"]) == 0  # starts it over
    assert json.loads((run / "summary.json").read_text())["evaluations"] == []


@pytest.mark.slow  # a child process killed with SIGKILL
def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(
    fast_args, tmp_path, capsys
):
    run = tmp_path / "run"
    killed = _child(fast_args, KILL)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (run / "settings.toml").is_file() and not (run / "last.pt").exists()
    assert len(_events(run)) == 1

    assert main(_resume(run)) == 0
    err = capsys.readouterr().err
    assert f"{run} holds a run stopped before its first checkpoint (no last.pt)" in err
    assert "starting it " in err
    assert "over from epoch 0 with its saved settings (removed its views.png, tensorboard)" in err
    state = load_checkpoint(run)
    assert (state["epoch"], state["step"]) == (2, 4)
    assert len(_events(run)) == 1  # the killed start's events went with it


def test_stale_checkpoint_temporaries_are_removed_on_resume_and_more_epochs_is_a_note(
    fast_args, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    stale = run / ".last.pt.k1ll3d_.tmp"  # what a kill during save_checkpoint leaves
    stale.write_bytes(os.urandom(3_000_000))
    capsys.readouterr()

    assert main(_resume(run, "--epochs", "2")) == 0
    err = capsys.readouterr().err
    assert f"removed 1 temporary file(s) of a checkpoint write that was cut short: {stale}" in err
    assert "train.epochs is now 2 (the run was set for 1): epoch 2 is a new cycle of the " in err
    assert not stale.exists()
    assert load_checkpoint(run)["epoch"] == 2


def test_resume_that_changes_the_steps_of_an_epoch_is_refused(fast_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    capsys.readouterr()
    fewer = _resume(run, "--epochs", "2", "--set", "train.max_steps_per_epoch=1")
    assert main(fewer) == 2
    err = capsys.readouterr().err
    assert f"cannot resume the run in {str(run)!r}: its epochs have 2 steps, these settings " in err
    assert "make them 1. A run keeps the steps of its epochs to the end" in err
    assert "or start a new run with another --out" in err
    assert main(_resume(run, "--epochs", "2", "--batch-size", "16")) == 2  # 5 steps, not 2
    err = capsys.readouterr().err
    assert "its batch size is 32, these settings make it 16; its epochs have 2 steps, " in err

    state = load_checkpoint(run)  # as version 1 wrote it before the steps of an epoch were saved
    del state["steps_per_epoch"], state["batch_size"]
    save_checkpoint({**state, "version": 1}, run / "last.pt")
    assert main(fewer) == 2  # 2 steps in 1 epoch: told by the step and the epoch
    assert "its epochs have 2 steps, these settings make them 1" in capsys.readouterr().err
    state = load_checkpoint(run)
    assert (state["epoch"], state["step"]) == (1, 2)

    # inside an epoch, an old checkpoint does not tell its steps: accepted
    state.update(step=3, epoch_loss_sum=4.0, version=1)
    del state["steps_per_epoch"], state["batch_size"]
    save_checkpoint(state, run / "last.pt")
    assert main(_resume(run, "--epochs", "2")) == 0
    assert load_checkpoint(run)["step"] == 4


def test_resume_refuses_other_components_another_folder_and_overwrite(fast_args, tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(_resume(run, "--plugin", "simclr")) == 2
    err = capsys.readouterr().err
    assert "the run was trained with plugin 'byol' (asked: 'simclr'); a resumed run keeps" in err
    assert main(_resume(run, "--loss", "simclr", "--epochs", "2")) == 2
    assert "loss 'byol' (asked: 'simclr')" in capsys.readouterr().err
    assert main(_resume(run, "--out", str(elsewhere))) == 2
    err = capsys.readouterr().err
    assert f"a resumed run continues in its own folder, {str(run)!r}" in err
    assert not elsewhere.exists()
    assert main(_resume(run, "--out", str(run), "--overwrite")) == 2
    assert "--overwrite starts one over; give one of them" in capsys.readouterr().err
    assert load_checkpoint(run)["epoch"] == 1


def test_a_real_full_disk_is_told_in_words(tmp_path):
    with pytest.raises((OSError, RuntimeError)) as caught, open("/dev/full", "wb", 0) as handle:
        torch.save({"x": torch.zeros(100_000)}, handle)  # ENOSPC, bare or wrapped by torch
    assert write_failure(caught.value) == "the disk is full (No space left on device)"


@pytest.mark.slow  # two runs in child processes
def test_a_first_checkpoint_too_big_for_the_disk_is_an_error_then_resume_starts_over(
    fast_args, tmp_path, run_cli, capsys
):
    run = tmp_path / "run"
    done = run_cli(fast_args, max_file_bytes=500_000)  # the checkpoint is about 1.9 MB
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (
        f"sslplug: error: could not write the checkpoint {str(run / 'last.pt')!r}: a file size "
        f"limit was reached" in done.stderr
    )
    assert "no checkpoint of this run was written before it. When there is room again, " in (
        done.stderr
    )
    assert f"`sslplug run --resume {run}` starts the run over" in done.stderr
    assert not (run / "last.pt").exists() and not list(run.glob(".last.pt.*"))

    assert main(_resume(run)) == 0
    assert load_checkpoint(run)["epoch"] == 2


@pytest.mark.slow  # a run in a child process
def test_a_full_disk_at_a_later_checkpoint_keeps_the_previous_one(fast_args, tmp_path, run_cli):
    run = tmp_path / "run"
    assert main(_with(fast_args, "--epochs", "1")) == 0
    size = (run / "last.pt").stat().st_size
    done = run_cli(_resume(run, "--epochs", "2"), max_file_bytes=size // 2)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "a file size limit was reached (see `ulimit -f`) (File too large); the previous " in (
        done.stderr
    )
    assert "checkpoint there, of epoch 1 (step 2), is intact. When there is room again, " in (
        done.stderr
    )
    assert f"continue with `sslplug run --resume {run}`" in done.stderr
    assert not list(run.glob(".last.pt.*"))
    state = load_checkpoint(run)
    assert (state["epoch"], state["step"]) == (1, 2)


@pytest.mark.slow  # runs in child processes without root's power over permissions
@pytest.mark.parametrize("read_only", ["parent", "folder"])
def test_a_read_only_out_is_a_clear_error(fast_args, tmp_path, run_cli, read_only):
    parent = tmp_path / "parent"
    out = parent / "run"
    out.mkdir(parents=True)
    (parent if read_only == "parent" else out).chmod(0o555)
    if read_only == "parent":
        out.rmdir()
    try:
        done = run_cli(_with(fast_args, "--out", str(out)), unprivileged=True)
    finally:
        for folder in (parent, out):
            if folder.exists():
                folder.chmod(0o755)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    if read_only == "parent":
        expected = f"cannot create the run folder {str(out)!r} in {str(parent)!r}: Permission "
        expected += "denied; give an --out in a folder you can write to"
    else:
        expected = f"cannot write in the run folder {str(out)!r}: Permission denied; make it "
        expected += "writable or give another --out"
    assert expected in done.stderr


@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_out_that_is_or_lies_under_a_file_is_a_clear_error(fast_args, tmp_path, capsys, where):
    file = tmp_path / "file"
    file.write_text("a file")
    out = file if where == "out" else file / "run"
    assert main(_with(fast_args, "--out", str(out))) == 2
    err = capsys.readouterr().err
    if where == "out":
        assert f"--out {str(file)!r} is a file, not a folder; give a folder for the run" in err
    else:
        assert f"cannot create the run folder {str(out)!r}: {str(file)!r} is a file" in err
    assert file.read_text() == "a file"
