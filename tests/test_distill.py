"""Distillation: the teacher stays frozen and out of checkpoints, sees the student's views at
its own size and in bf16 where the device has it, and a distillation run resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
from sslplug_methods.distill import DistillLoss

from sslplug.assembly import assemble
from sslplug.checkpoint import load_checkpoint
from sslplug.components import Outputs, Views
from sslplug.engine import train_step
from sslplug.errors import CheckpointError
from sslplug.runtime import Precision
from sslplug.teacher import FrozenTeacher

from .harness import assert_same_checkpoints, config_of, stop_and_resume, train_pinned
from .test_method_contract import NARROW, SHORT

SETTINGS = [*SHORT, "components.plugin=distill", *NARROW["distill"]]


def _built(registry, *assignments: str):
    torch.manual_seed(0)
    config = config_of(registry, [*SETTINGS, *assignments])
    return assemble(
        config, registry, image_size=32, device=torch.device("cpu"), steps_per_epoch=4,
        total_steps=4,
    )  # fmt: skip


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)


def test_the_teacher_is_unchanged_by_training_and_gets_no_gradient(registry):
    built = _built(registry, "distill.loss=both")
    teacher = built.parts.target_update
    assert isinstance(teacher, FrozenTeacher)
    before = {k: v.clone() for k, v in teacher.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in built.parts.encoder.state_dict().items()}
    built.parts.encoder.train(), teacher.train()
    assert not teacher.teacher.training  # its batch-norm statistics are not updated either
    for step in range(3):
        views = built.parts.views(_batch())
        train_step(
            built.parts, built.optimization, views, step, 4, torch.autocast("cpu", enabled=False)
        )
    after = teacher.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.teacher.parameters())
    moved = built.parts.encoder.state_dict()
    assert any(not torch.equal(student[k], moved[k]) for k in student)
    teacher_params = {id(p) for p in teacher.teacher.parameters()}
    for group in built.optimization.optimizer.param_groups:
        assert not teacher_params & {id(p) for p in group["params"]}


def test_the_teacher_sees_the_views_at_its_own_size(registry):
    built = _built(registry, "distill.teacher_image_size=48")
    seen: list[tuple[int, ...]] = []
    teacher = built.parts.target_update
    teacher.teacher.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    views = built.parts.views(_batch())
    target = teacher(views)
    assert seen == [(8, 3, 48, 48), (8, 3, 48, 48)]
    assert [f.shape for f in target.features] == [(8, 128), (8, 128)]


def test_the_teacher_runs_in_bf16_where_the_device_computes_in_it(registry, monkeypatch):
    built = _built(registry)
    teacher = built.parts.target_update
    modes: list[tuple[bool, torch.dtype]] = []
    teacher.teacher.register_forward_pre_hook(
        lambda m, a: modes.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        )
    )
    views = built.parts.views(_batch())
    monkeypatch.setattr("sslplug.teacher.resolve_precision", lambda s, d: Precision("bf16", "test"))
    target = teacher(views)
    monkeypatch.setattr("sslplug.teacher.resolve_precision", lambda s, d: Precision("fp32", "test"))
    teacher(views)
    assert modes[0] == (True, torch.bfloat16) and modes[-1][0] is False
    assert all(f.dtype == torch.float32 for f in target.features)


def test_a_distillation_run_resumes_bit_for_bit_without_the_teacher_in_its_checkpoint(tmp_path):
    settings = [*SETTINGS, "distill.loss=both", "distill.queue_size=16"]
    train_pinned(tmp_path / "straight", settings)
    stop_and_resume(tmp_path / "resumed", settings, stop_after=1)
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "resumed")
    saved = load_checkpoint(tmp_path / "straight")
    assert not [k for k in saved["target_update"] if k.startswith("teacher.")]
    assert set(saved["target_update"]) == {"teacher_fingerprint"}
    assert saved["loss"]["queue"].shape == (16, 128)


def test_resuming_with_another_teacher_is_refused(tmp_path):
    settings = [*SHORT, "components.plugin=distill", "distill.head_hidden_dim=64"]
    teacher_a = tmp_path / "teacher_a"
    train_pinned(teacher_a, [*SHORT, "components.plugin=simclr"])
    teacher_b = tmp_path / "teacher_b"
    train_pinned(teacher_b, [*SHORT, "components.plugin=simclr", "train.seed=1"])
    run = tmp_path / "run"
    train_pinned(run, [*settings, f"distill.teacher={teacher_a}", "train.epochs=1"])
    with pytest.raises(CheckpointError, match="is not the one this run was trained with"):
        train_pinned(run, [*settings, f"distill.teacher={teacher_b}"], resume=run)


def test_the_loss_is_the_distance_of_normalised_features_and_the_queue_s_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    views = Views(images=(torch.zeros(4, 3, 8, 8),))
    mse = DistillLoss("mse", 8, 16, 0.1)
    result = mse(Outputs(projections=(s,)), views, Outputs(features=(t,)))
    expected = torch.nn.functional.normalize(s, dim=1) - torch.nn.functional.normalize(t, dim=1)
    assert torch.allclose(result.loss, expected.pow(2).sum(1).mean())

    torch.manual_seed(1)
    matched = DistillLoss("queue", 8, 16, 0.1)
    torch.manual_seed(1)
    unmatched = DistillLoss("queue", 8, 16, 0.1)
    assert torch.equal(matched.queue, unmatched.queue)
    # cross-entropy to the teacher's distribution is least where the student's equals it
    best = matched(Outputs(projections=(t,)), views, Outputs(features=(t,))).loss
    assert best < unmatched(Outputs(projections=(s,)), views, Outputs(features=(t,))).loss
    assert int(matched.queue_ptr) == 4
    assert torch.allclose(matched.queue[:4], torch.nn.functional.normalize(t, dim=1))
