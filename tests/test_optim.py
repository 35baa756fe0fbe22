"""Optimization: the default groups, and the rules components declare (sslplug.optim)."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sslplug.config import OptimSettings
from sslplug.errors import CheckpointError, ConfigError
from sslplug.optim import (
    LARS,
    Optimization,
    OptimRules,
    ParamGroup,
    build_optimizer,
    warmup_cosine,
)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, optimization: Optimization, steps: range, scale: float = 1.0) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        optimization.zero_grad()
        (scale * F.mse_loss(model(x), y)).backward()
        optimization.step(step)


def _group(optimization: Optimization, name: str) -> dict:
    (group,) = [g for g in optimization.optimizer.param_groups if g["name"] == name]
    return group


def _reference_optimizer(settings: OptimSettings, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer as built before optimiser rules existed, written out independently."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if settings.name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    if settings.name == "lars":
        groups[1]["lars_exclude"] = True
        return LARS(groups, lr=settings.lr, momentum=settings.momentum)
    return torch.optim.AdamW(groups, lr=settings.lr)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_without_rules_training_is_bit_identical_to_the_plain_optimizer(name):
    settings = OptimSettings(name=name, lr=0.05, weight_decay=0.01, warmup_epochs=1.0)
    steps_per_epoch, total = 3, 7
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    models = [_model() for _ in range(3)]
    reference = _reference_optimizer(settings, models[0])
    plain = build_optimizer(settings, [models[1]])
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
        for opt in (reference, plain)
    ]
    optimization = Optimization(settings, [models[2]], steps_per_epoch, total)
    for step in range(total):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        for model, opt, schedule in zip(models, (reference, plain), schedules):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            schedule.step()
        optimization.zero_grad()
        F.mse_loss(models[2](x), y).backward()
        optimization.step(step)
        assert optimization.last_lr() == schedules[0].get_last_lr()[0]
    for other in models[1:]:
        for p, q in zip(models[0].parameters(), other.parameters(), strict=True):
            assert torch.equal(p, q)
    assert not torch.equal(models[0][0].weight, _model()[0].weight)


def test_a_checkpoint_of_the_plain_optimizer_resumes_in_optimization():
    settings = OptimSettings(name="sgd", lr=0.05, weight_decay=0.01)
    uninterrupted, first, second = _model(), _model(), _model(seed=1)
    optimization = Optimization(settings, [uninterrupted], 2, 6)
    _train(uninterrupted, optimization, range(6))

    plain = build_optimizer(settings, [first])
    schedule = torch.optim.lr_scheduler.LambdaLR(plain, warmup_cosine(2, 6))
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        plain.zero_grad()
        F.mse_loss(first(x), y).backward()
        plain.step()
        schedule.step()
    second.load_state_dict(first.state_dict())
    resumed = Optimization(settings, [second], 2, 6)
    resumed.load_state_dict({"optimizer": plain.state_dict(), "scheduler": schedule.state_dict()})
    assert [g["name"] for g in resumed.optimizer.param_groups] == ["decay", "no_decay"]
    _train(second, resumed, range(3, 6))
    for p, q in zip(uninterrupted.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("frozen_epochs", "frozen_steps", "steps_per_epoch", "frozen_for"),
    [(0.0, 3, 10, 3), (1.0, 0, 2, 2), (1.0, 1, 3, 3), (0.5, 4, 4, 4)],
)
@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_a_frozen_group_stays_put_then_trains(
    name, frozen_epochs, frozen_steps, steps_per_epoch, frozen_for
):
    model = _model()
    head = model[3]
    rules = OptimRules(
        groups=(ParamGroup(head, "head", frozen_epochs=frozen_epochs, frozen_steps=frozen_steps),)
    )
    # Weight decay and warm-up-free lr, so that anything not skipped would move.
    settings = OptimSettings(name=name, lr=0.05, weight_decay=0.1, warmup_epochs=0.0)
    optimization = Optimization(settings, [model], steps_per_epoch, 20, [rules])
    start_head = [p.detach().clone() for p in head.parameters()]
    start_first = model[0].weight.detach().clone()
    _train(model, optimization, range(frozen_for))
    for p, start in zip(head.parameters(), start_head):
        assert torch.equal(p, start)
    assert not torch.equal(model[0].weight, start_first)
    _train(model, optimization, range(frozen_for, frozen_for + 1))
    for p, start in zip(head.parameters(), start_head):
        assert not torch.equal(p, start)


def test_lr_scale_and_fixed_lr_over_the_schedule():
    model = _model()
    rules = OptimRules(
        groups=(
            ParamGroup(model[0], "scaled", lr_scale=0.5),
            ParamGroup([model[3].weight, model[3].bias], "fixed", lr_scale=2.0, fixed_lr=True),
        )
    )
    settings = OptimSettings(name="sgd", lr=0.1, weight_decay=0.0, warmup_epochs=1.0)
    optimization = Optimization(settings, [model], 4, 12, [rules])
    factor = warmup_cosine(4, 12)
    assert [g["name"] for g in optimization.optimizer.param_groups] == [
        "decay",
        "no_decay",
        "scaled",
        "scaled.no_decay",
        "fixed",
        "fixed.no_decay",
    ]
    for step in range(12):
        expected = {
            "decay": 0.1 * factor(step),
            "scaled": 0.05 * factor(step),
            "scaled.no_decay": 0.05 * factor(step),
            "fixed": 0.2,
            "fixed.no_decay": 0.2,
        }
        for name, lr in expected.items():
            assert _group(optimization, name)["lr"] == pytest.approx(lr, abs=1e-12), (step, name)
        assert optimization.last_lr() == pytest.approx(0.1 * factor(step))
        _train(model, optimization, range(step, step + 1))
    assert factor(3) == 1.0 and factor(11) < 0.05  # the schedule did warm up and decay


def test_claimed_parameters_leave_the_default_groups():
    model = _model()
    optimization = Optimization(
        OptimSettings(), [model], 2, 4, [OptimRules(groups=(ParamGroup(model[3], "head"),))]
    )
    default = {id(p) for g in optimization.optimizer.param_groups[:2] for p in g["params"]}
    assert default == {id(p) for m in (model[0], model[1]) for p in m.parameters()}
    assert _group(optimization, "head")["params"] == [model[3].weight]
    assert _group(optimization, "head.no_decay")["params"] == [model[3].bias]
    assert _group(optimization, "head.no_decay")["weight_decay"] == 0.0


def test_lars_excludes_biases_of_a_param_group_from_trust_ratio():
    model = _model()
    optimization = Optimization(
        OptimSettings(name="lars"), [model], 2, 4, [OptimRules(groups=(ParamGroup(model[3]),))]
    )
    assert _group(optimization, "group0.no_decay")["lars_exclude"]
    assert not _group(optimization, "group0")["lars_exclude"]


def test_a_group_without_trainable_parameters_is_skipped():
    model, frozen = _model(), nn.Linear(3, 3)
    frozen.requires_grad_(False)
    optimization = Optimization(
        OptimSettings(), [model], 2, 4, [OptimRules(groups=(ParamGroup(frozen, "frozen"),))]
    )
    assert [g["name"] for g in optimization.optimizer.param_groups] == ["decay", "no_decay"]


def test_a_parameter_in_two_groups_is_an_error_naming_both():
    model = _model()
    rules = [
        OptimRules(groups=(ParamGroup(model[3], "head"),)),
        OptimRules(groups=(ParamGroup([model[3].weight], "predictor"),)),
    ]
    with pytest.raises(ConfigError, match="'head' and 'predictor'"):
        Optimization(OptimSettings(), [model], 2, 4, rules)


def _norm_seen_by_optimizer(optimization: Optimization) -> list[float]:
    """The gradient norm of all trained parameters just before each optimizer step."""
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    optimization.optimizer.register_step_pre_hook(record)
    return norms


def test_gradient_clipping_bounds_the_global_norm_at_the_smallest_asked():
    model = _model()
    rules = [OptimRules(clip_grad_norm=5.0), OptimRules(clip_grad_norm=0.5), OptimRules()]
    optimization = Optimization(OptimSettings(), [model], 2, 4, rules)
    norms = _norm_seen_by_optimizer(optimization)
    _train(model, optimization, range(3), scale=1000.0)
    assert norms == pytest.approx([0.5] * 3, rel=1e-4)

    # The same step unclipped sees a far larger norm, so the bound above is the clipping's doing.
    unclipped_model = _model()
    unclipped = Optimization(OptimSettings(), [unclipped_model], 2, 4)
    norms = _norm_seen_by_optimizer(unclipped)
    _train(unclipped_model, unclipped, range(1), scale=1000.0)
    assert norms[0] > 50.0


def test_clipping_ignores_frozen_groups():
    model = _model()
    rules = OptimRules(groups=(ParamGroup(model[3], "head", frozen_steps=1),), clip_grad_norm=0.5)
    optimization = Optimization(OptimSettings(), [model], 2, 4, [rules])
    norms = _norm_seen_by_optimizer(optimization)
    _train(model, optimization, range(1), scale=1000.0)
    assert model[3].weight.grad is None
    assert norms == pytest.approx([0.5], rel=1e-4)


def _weight_decays_seen(optimization: Optimization) -> list[dict[str, float]]:
    """The weight decay of each parameter group at every optimizer step, as it steps."""
    seen: list[dict[str, float]] = []
    optimization.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            {g["name"]: g["weight_decay"] for g in opt.param_groups}
        )
    )
    return seen


def test_weight_decay_follows_a_cosine_from_start_to_end():
    model = _model()
    rules = [
        OptimRules(weight_decay_end=0.4),
        OptimRules(groups=(ParamGroup(model[3], "head", weight_decay=0.08),)),
        OptimRules(weight_decay_end=0.4),
    ]
    optimization = Optimization(OptimSettings(weight_decay=0.04), [model], 2, 11, rules)
    seen = _weight_decays_seen(optimization)
    _train(model, optimization, range(11))
    expected = {0: (0.04, 0.08), 5: (0.22, 0.44), 10: (0.4, 0.8)}
    for step, (default, head) in expected.items():
        assert seen[step]["decay"] == pytest.approx(default)
        assert seen[step]["head"] == pytest.approx(head)
        assert seen[step]["no_decay"] == 0.0 and seen[step]["head.no_decay"] == 0.0
    assert all(a["decay"] < b["decay"] for a, b in itertools.pairwise(seen))
    assert optimization.weight_decay_factor(5) == pytest.approx(0.22 / 0.04)


def test_a_relative_weight_decay_schedule_scales_each_groups_own_decay():
    model = _model()
    rules = [
        OptimRules(
            groups=(ParamGroup(model[3], "head", weight_decay=0.04),),
            weight_decay_end_factor=10.0,
        )
    ]
    # optim.weight_decay 0 is allowed: nothing is relative to it
    optimization = Optimization(OptimSettings(weight_decay=0.0), [model], 2, 11, rules)
    seen = _weight_decays_seen(optimization)
    _train(model, optimization, range(11))
    for step, head in {0: 0.04, 5: 0.22, 10: 0.4}.items():
        assert seen[step]["head"] == pytest.approx(head)
        assert seen[step]["decay"] == 0.0 and seen[step]["head.no_decay"] == 0.0
    assert all(a["head"] < b["head"] for a, b in itertools.pairwise(seen))


def test_both_forms_of_a_weight_decay_schedule_are_an_error_naming_them():
    with pytest.raises(ConfigError, match=r"weight_decay_end=0.4 and weight_decay_end_factor=10"):
        OptimRules(weight_decay_end=0.4, weight_decay_end_factor=10.0)
    rules = [OptimRules(weight_decay_end=0.4), OptimRules(weight_decay_end_factor=10.0)]
    with pytest.raises(ConfigError, match=r"weight_decay_end \[0.4\], weight_decay_end_factor"):
        Optimization(OptimSettings(), [_model()], 2, 4, rules)


def test_a_weight_decay_schedule_needs_a_starting_weight_decay():
    with pytest.raises(ConfigError, match=r"optim.weight_decay, which is 0.0"):
        Optimization(
            OptimSettings(weight_decay=0.0), [_model()], 2, 4, [OptimRules(weight_decay_end=0.4)]
        )


def test_different_final_weight_decays_are_an_error_naming_them():
    rules = [OptimRules(weight_decay_end=0.4), OptimRules(weight_decay_end=0.1)]
    with pytest.raises(ConfigError, match=r"\[0.1, 0.4\]"):
        Optimization(OptimSettings(), [_model()], 2, 4, rules)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ParamGroup([], lr_scale=math.nan),
        lambda: ParamGroup([], lr_scale=-1.0),
        lambda: ParamGroup([], weight_decay=math.inf),
        lambda: ParamGroup([], frozen_epochs=math.inf),
        lambda: ParamGroup([], frozen_steps=-1),
        lambda: OptimRules(clip_grad_norm=math.nan),
        lambda: OptimRules(weight_decay_end=-0.1),
        lambda: OptimRules(weight_decay_end_factor=math.nan),
        lambda: Optimization(OptimSettings(lr=math.inf), [_model()], 2, 4),
        lambda: Optimization(OptimSettings(weight_decay=math.nan), [_model()], 2, 4),
    ],
)
def test_non_finite_or_negative_values_are_config_errors(make):
    with pytest.raises(ConfigError, match="must be"):
        make()


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_resuming_from_the_state_dict_matches_an_uninterrupted_run(name):
    def rules_for(model: nn.Module) -> list[OptimRules]:
        return [
            OptimRules(
                groups=(
                    ParamGroup(model[3], "head", lr_scale=0.5, frozen_steps=2),
                    ParamGroup(model[1], "norm", fixed_lr=True),
                ),
                clip_grad_norm=1.0,
                weight_decay_end=0.2,
            )
        ]

    settings = OptimSettings(name=name, lr=0.05, weight_decay=0.02, warmup_epochs=1.0)
    uninterrupted = _model()
    optimization = Optimization(settings, [uninterrupted], 2, 6, rules_for(uninterrupted))
    _train(uninterrupted, optimization, range(6), scale=10.0)

    first = _model()
    optimization = Optimization(settings, [first], 2, 6, rules_for(first))
    _train(first, optimization, range(3), scale=10.0)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": optimization.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    second = _model(seed=1)
    second.load_state_dict(checkpoint["model"])
    resumed = Optimization(settings, [second], 2, 6, rules_for(second))
    resumed.load_state_dict(checkpoint["optim"])
    assert resumed.last_lr() == optimization.last_lr()
    _train(second, resumed, range(3, 6), scale=10.0)
    for p, q in zip(uninterrupted.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_with_other_groups_is_a_checkpoint_error():
    model = _model()
    plain = Optimization(OptimSettings(), [model], 2, 4)
    grouped = Optimization(
        OptimSettings(), [model], 2, 4, [OptimRules(groups=(ParamGroup(model[3], "head"),))]
    )
    with pytest.raises(CheckpointError, match=r"2 parameter groups, this run has 4"):
        grouped.load_state_dict(plain.state_dict())
