"""The tutorial's masked-token plugin (docs/examples/sslplug-masked-tokens): the page shows the
module as it is, it is under 150 lines, it reaches into nothing private, and it trains,
resumes bit for bit and learns to match its teacher at the hidden patches."""

from __future__ import annotations

import importlib.util
import math
import re
import types
from pathlib import Path

import pytest
import torch

from .harness import (
    StepRecorder,
    StopAfterEpoch,
    assert_public_api_only,
    assert_same_checkpoints,
    train_pinned,
)

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "docs" / "examples" / "sslplug-masked-tokens" / "sslplug_masked_tokens.py"
TUTORIAL = ROOT / "docs" / "tutorial.md"
ALLOWED = {"__future__", "collections.abc", "attrs", "torch", "torch.nn", "torch.nn.functional"}


def _load() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("sslplug_masked_tokens", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tutorial_shows_the_module_as_it_is_in_under_150_lines() -> None:
    code = MODULE.read_text()
    assert len(code.splitlines()) < 150
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), re.DOTALL)
    assert code in blocks, "docs/tutorial.md should show the masked-token module as it is"


def test_the_module_uses_sslplugs_public_api_only() -> None:
    assert_public_api_only(MODULE, ALLOWED)


# the module is registered beside the installed plugins under the name extra0
SHORT = [
    "components.plugin=extra0",
    "model.backbone=vit_micro",
    "train.batch_size=16",
    "train.epochs=2",
    "train.max_steps_per_epoch=2",
    "train.log_every=1",
    "train.disable=['progress','knn','health','view_grid','tensorboard']",
    "data.workers=0",
    "knn.baseline=false",
    "health.baseline=false",
]


@pytest.mark.slow  # three short runs
def test_the_module_trains_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    plugin = _load()
    straight = train_pinned(tmp_path / "straight", SHORT, plugin)
    assert straight["steps"] == 4 and math.isfinite(straight["final_loss"])
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_pinned(resumed, SHORT, plugin, StopAfterEpoch(1))
    train_pinned(resumed, SHORT, plugin, resume=resumed)
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow  # 30 steps on the default data
def test_the_student_learns_to_match_the_teacher_at_the_hidden_patches(tmp_path: Path) -> None:
    recorder = StepRecorder()
    steps = [s for s in SHORT if not s.startswith(("train.epochs", "train.max_steps"))]
    train_pinned(
        tmp_path / "run",
        [*steps, "train.epochs=1", "train.max_steps_per_epoch=30", "extra0.momentum=0.99"],
        _load(),
        recorder,
    )
    losses = [m["loss"] for m in recorder.steps]
    assert len(losses) == 30 and all(0 < x < math.log(256) + 1 for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert torch.tensor([m["masked"] for m in recorder.steps]).gt(0).all()
