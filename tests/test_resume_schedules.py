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

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from sslplug.config import load_config
from sslplug.errors import ConfigError
from sslplug.optim import Cycles, cycles_of, warmup_cosine
from tests.conftest import FAST
from tests.harness import (
    StepRecorder,
    StopAfterEpoch,
    assert_same_checkpoints,
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


def _lrs(recorder: StepRecorder) -> list[float]:
    return [entry["lr"] for entry in recorder.steps]


@pytest.mark.parametrize(
    ("extend", "cycles"), [("restart", "[[0, 2], [2, 4]]"), ("continue", "[[0, 2]]")]
)
def test_a_finished_run_extended_equals_a_straight_run_of_those_cycles(tmp_path, extend, cycles):
    extended = tmp_path / "extended"
    train_pinned(extended, [*SMALL, "train.epochs=2"])
    recorder = StepRecorder()
    summary = train_pinned(
        extended, [*SMALL, "train.epochs=4", f"train.extend={extend}"], recorder, resume=extended
    )
    assert summary["epochs"] == 4
    straight = tmp_path / "straight"
    train_pinned(straight, [*SMALL, "train.epochs=4", f"train.cycles={cycles}"])
    assert_same_checkpoints(extended, straight)
    saved = tomllib.loads((extended / "settings.toml").read_text())["train"]
    assert saved["cycles"] == json.loads(cycles) and saved["extend"] == extend
    # the lr after each of the four added steps (LambdaLR: the rate of the next step)
    lrs = _lrs(recorder)
    assert len(lrs) == 4
    if extend == "restart":  # a warm-up epoch (0.5, 1.0 of the base), then the cosine to 0
        assert lrs == pytest.approx([LR, LR, LR * 0.5 * (1 + math.cos(math.pi / 2)), 0.0])
        assert max(lrs) == pytest.approx(LR)  # back at the base, never above
    else:  # the planned cosine has ended: the floor, 0, throughout
        assert lrs == [0.0, 0.0, 0.0, 0.0]


def test_an_extended_run_stopped_and_resumed_again_equals_one_not_stopped(tmp_path):
    run = tmp_path / "run"
    train_pinned(run, [*SMALL, "train.epochs=2"])
    extend = [*SMALL, "train.epochs=4"]
    with pytest.raises(KeyboardInterrupt):
        train_pinned(run, extend, StopAfterEpoch(3), resume=run)
    train_pinned(run, extend, resume=run)  # the saved cycles, not a new plan over 4 epochs
    straight = tmp_path / "straight"
    train_pinned(straight, [*SMALL, "train.epochs=4", "train.cycles=[[0, 2], [2, 4]]"])
    assert_same_checkpoints(run, straight)


def test_a_run_resumed_to_its_plan_keeps_one_cycle_and_equals_a_straight_run(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_pinned(run, [*SMALL, "train.epochs=3"], StopAfterEpoch(1))
    train_pinned(run, [*SMALL, "train.epochs=3"], resume=run)
    straight = tmp_path / "straight"
    train_pinned(straight, [*SMALL, "train.epochs=3"])
    assert_same_checkpoints(run, straight)
    assert tomllib.loads((run / "settings.toml").read_text())["train"]["cycles"] == []
