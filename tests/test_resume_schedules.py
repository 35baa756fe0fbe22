"""Resuming a run to more epochs than it planned: the schedules either start a new cycle over
the added epochs (``train.extend = "restart"``, the default) or hold their end values
(``"continue"``); neither stretches the planned schedule, which would raise the learning rate
of a finished run again. Each extension equals a straight run with the same ``train.cycles``,
bit for bit, and so does an extended run stopped and resumed once more."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from torch import nn

from sslplug.checkpoint import load_checkpoint
from sslplug.commands import build_parser
from sslplug.commands.run import assignments
from sslplug.config import OptimSettings, load_config
from sslplug.errors import ConfigError
from sslplug.nn import cosine_tau
from sslplug.optim import Cycles, Optimization, OptimRules, cycles_of, warmup_cosine
from tests.conftest import FAST
from tests.harness import (
    StepRecorder,
    StopAfterEpoch,
    assert_same_checkpoints,
    stop_and_resume,
    train_pinned,
)

# 2 steps an epoch, warm-up of one epoch, no monitors: a few seconds a run
SMALL = [
    *FAST,
    "train.max_steps_per_epoch=2",
    "knn.every=0",
    "knn.baseline=false",
    "health.every=0",
    "health.baseline=false",
    "health.samples=0",
    "train.disable=['progress', 'view_grid', 'tensorboard', 'knn', 'health']",
]
LR = 2e-3
TAU = 0.996  # byol.tau_base, the default method's


def test_one_cycle_is_the_schedule_of_a_run_never_extended():
    cycles = Cycles(((0, 10),))
    assert [cycles.position(step) for step in (0, 9, 10, 14)] == [
        (0, 10),
        (9, 10),
        (10, 10),
        (10, 10),
    ]
    old = warmup_cosine(2, 10)
    assert [warmup_cosine(2, 10, 0.0)(step) for step in range(12)] == [old(s) for s in range(12)]


def test_a_restart_begins_a_cycle_and_a_gap_holds_the_end_before_it():
    cycles = Cycles(((0, 4), (6, 10)))
    assert cycles.position(3) == (3, 4)
    assert cycles.position(5) == (4, 4)  # held at the first cycle's end
    assert cycles.position(6) == (0, 4)
    assert cycles.position(12) == (4, 4)
    assert warmup_cosine(0, 4, 0.1)(4) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "spans", [[[1, 2]], [[0, 2], [1, 3]], [[0, 5]], [[0, 2], [3, 3]], [[0, 1, 2]]]
)
def test_cycles_that_are_not_valid_are_refused_naming_them(spans):
    with pytest.raises(ConfigError, match=r"train.cycles .*(not \[start, end\]|starts at 0)"):
        cycles_of(spans, 4, 2)


def test_cycles_are_read_from_the_settings():
    config = load_config(None, ["train.cycles=[[0, 2], [2, 4]]", "train.epochs=4"])
    assert config.train.cycles == ((0, 2), (2, 4))
    with pytest.raises(ConfigError, match=r"train\.extend"):
        load_config(None, ["train.extend=stretch"])


@pytest.mark.parametrize(
    ("spans", "at_restart"),
    [([[0, 2]], 10.0), ([[0, 2], [2, 4]], 1.0)],
    ids=["continue", "restart"],
)
def test_the_weight_decay_schedule_holds_its_end_or_starts_over_with_the_cycles(spans, at_restart):
    # DINO's rule: from optim.weight_decay (0.04) on a cosine to 0.4 at a cycle's last step
    optimization = Optimization(
        OptimSettings(weight_decay=0.04),
        [nn.Linear(2, 2)],
        steps_per_epoch=2,
        total_steps=8,
        rules=[OptimRules(weight_decay_end=0.4)],
        cycles=cycles_of(spans, 4, 2),
    )
    factors = [optimization.weight_decay_factor(step) for step in range(8)]
    # the planned 2 epochs: from 1 to 0.4 / 0.04 at their last step
    assert factors[:4] == pytest.approx([1.0, 0.75 + 0.25 * 10.0, 0.25 + 0.75 * 10.0, 10.0])
    assert factors[4] == pytest.approx(at_restart)
    assert factors[7] == pytest.approx(10.0)  # the end value, held or reached again


def test_extend_is_a_run_option_whose_help_names_the_default(capsys):
    parser = build_parser()
    args = parser.parse_args(["run", "--resume", "RUN", "--epochs", "4", "--extend", "continue"])
    assert "train.extend=continue" in assignments(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--extend", "stretch"])
    assert "invalid choice: 'stretch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    assert "restart (the default" in " ".join(capsys.readouterr().out.split())


def _lrs(recorder: StepRecorder) -> list[float]:
    return [entry["lr"] for entry in recorder.steps]


def _taus(recorder: StepRecorder) -> list[float]:
    return [entry["tau"] for entry in recorder.steps]


@pytest.mark.parametrize(
    ("extend", "cycles"), [("restart", "[[0, 2], [2, 4]]"), ("continue", "[[0, 2]]")]
)
def test_a_finished_run_extended_equals_a_straight_run_of_those_cycles(
    tmp_path, capsys, extend, cycles
):
    extended = tmp_path / "extended"
    train_pinned(extended, [*SMALL, "train.epochs=2"])
    finished = load_checkpoint(extended)
    capsys.readouterr()
    recorder = StepRecorder()
    summary = train_pinned(
        extended, [*SMALL, "train.epochs=4", f"train.extend={extend}"], recorder, resume=extended
    )
    assert summary["epochs"] == 4
    note = {
        "restart": "epochs 3-4 are a new cycle of the schedules (the learning rate warms up "
        "again over 1 epoch(s) and decays to the new end",
        "continue": "the schedules end at epoch 2 as planned and hold their end values for "
        "epochs 3-4: a learning rate of 0, so the scheduled weights no longer change",
    }
    assert (
        f"train.epochs is now 4 (the run was set for 2): {note[extend]}" in capsys.readouterr().err
    )
    straight = tmp_path / "straight"
    train_pinned(straight, [*SMALL, "train.epochs=4", f"train.cycles={cycles}"])
    assert_same_checkpoints(extended, straight)
    saved = tomllib.loads((extended / "settings.toml").read_text())["train"]
    assert saved["cycles"] == json.loads(cycles) and saved["extend"] == extend
    # the lr after each of the four added steps (LambdaLR: the rate of the next step)
    lrs = _lrs(recorder)
    assert len(lrs) == 4
    # BYOL's tau after each added step, from the target update's own metric
    taus = _taus(recorder)
    if extend == "restart":  # a warm-up epoch (0.5, 1.0 of the base), then the cosine to 0
        assert lrs == pytest.approx([LR, LR, LR * 0.5 * (1 + math.cos(math.pi / 2)), 0.0])
        assert max(lrs) == pytest.approx(LR)  # back at the base, never above
        assert taus == pytest.approx([cosine_tau(TAU, step, 4) for step in range(4)])
        assert taus[0] == pytest.approx(TAU)  # the target moves again from tau_base
    else:  # the planned cosine has ended: the floor, 0, throughout; tau at its end, 1
        assert lrs == [0.0, 0.0, 0.0, 0.0]
        assert taus == [1.0, 1.0, 1.0, 1.0]
    # at a rate of 0 and tau 1 no weight moves (only BatchNorm's running statistics)
    weights_moved = [
        name
        for part in ("encoder", "target_update")
        for name, tensor in load_checkpoint(extended)[part].items()
        if "running_" not in name
        and "num_batches" not in name
        and not torch.equal(tensor, finished[part][name])
    ]
    assert (weights_moved == []) == (extend == "continue"), weights_moved[:3]


def test_a_restart_without_warm_up_starts_at_the_base_rate(tmp_path, capsys):
    run = tmp_path / "run"
    train_pinned(run, [*SMALL, "train.epochs=2"])
    recorder = StepRecorder()
    capsys.readouterr()
    train_pinned(run, [*SMALL, "train.epochs=4", "optim.warmup_epochs=0"], recorder, resume=run)
    assert "(the learning rate starts again at optim.lr and decays" in capsys.readouterr().err
    # SGDR's restart: the first added step at the base rate, then the cosine to 0
    expected = [LR * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(1, 5)]
    assert _lrs(recorder) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("extend", "cycles"), [("restart", "[[0, 2], [2, 4]]"), ("continue", "[[0, 2]]")]
)
def test_an_extended_run_stopped_and_resumed_again_equals_one_not_stopped(tmp_path, extend, cycles):
    run = tmp_path / "run"
    train_pinned(run, [*SMALL, "train.epochs=2"])
    with pytest.raises(KeyboardInterrupt):
        train_pinned(
            run, [*SMALL, "train.epochs=4", f"train.extend={extend}"], StopAfterEpoch(3), resume=run
        )
    # resumed again with the default extend (restart): the saved cycles decide the schedules
    train_pinned(run, [*SMALL, "train.epochs=4"], resume=run)
    straight = tmp_path / "straight"
    train_pinned(straight, [*SMALL, "train.epochs=4", f"train.cycles={cycles}"])
    assert_same_checkpoints(run, straight)


def test_continue_with_a_floor_says_the_rate_the_added_epochs_hold(tmp_path, capsys):
    run = tmp_path / "run"
    floor = [*SMALL, "optim.lr_floor=0.1"]
    train_pinned(run, [*floor, "train.epochs=2"])
    recorder = StepRecorder()
    capsys.readouterr()
    train_pinned(run, [*floor, "train.epochs=3", "train.extend=continue"], recorder, resume=run)
    assert "hold their end values for epoch 3: a learning rate of 0.0002 (optim.lr_floor " in (
        capsys.readouterr().err
    )
    assert _lrs(recorder) == pytest.approx([LR * 0.1, LR * 0.1])


def test_a_run_resumed_to_its_plan_keeps_one_cycle_and_equals_a_straight_run(tmp_path):
    run = tmp_path / "run"
    stop_and_resume(run, [*SMALL, "train.epochs=4"], stop_after=2)
    straight = tmp_path / "straight"
    train_pinned(straight, [*SMALL, "train.epochs=4"])
    assert_same_checkpoints(run, straight)
    assert tomllib.loads((run / "settings.toml").read_text())["train"]["cycles"] == []
