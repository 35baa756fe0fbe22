"""DINO: the loss and the centring against formulas written out here, the teacher's temperature
and inputs, the optimiser rules (frozen last layer, weight-decay cosine), the centre over two
gloo ranks, a run on the default data with bit-exact resume, and its mixes."""

from __future__ import annotations

import math
import os
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sslplug_methods import dino
from torch import Tensor, nn

import sslplug
from sslplug.checkpoint import load_checkpoint
from sslplug.config import OptimSettings, RunConfig, RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.nn import SmallConvNet, build_backbone
from sslplug.optim import Optimization
from sslplug.plugins import PluginRegistry

from .harness import StopAfterEpoch

# narrow heads and two local crops: the recipe's every part, at a fraction of its cost
NARROW = [
    "dino.hidden_dim=64",
    "dino.bottleneck_dim=32",
    "dino.out_dim=128",
    "dino.local_crops_number=2",
]


def softmax_rows(rows: list[list[float]], temperature: float) -> list[list[float]]:
    out = []
    for row in rows:
        top = max(x / temperature for x in row)
        e = [math.exp(x / temperature - top) for x in row]
        out.append([x / sum(e) for x in e])
    return out


def reference_loss(
    teacher_logits: list[list[list[float]]],
    center: list[float],
    student_logits: list[list[list[float]]],
    teacher_temp: float,
    student_temp: float,
) -> float:
    """Eq. 3 of Caron et al. with Algorithm 1's centring, in plain Python: the teacher sees the
    first ``len(teacher_logits)`` views, the student every view; pairs of the same view skip."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher_logits):
        centred = [[x - c for x, c in zip(row, center)] for row in t]
        p_t = softmax_rows(centred, teacher_temp)
        for j, s in enumerate(student_logits):
            if j == i:
                continue
            p_s = softmax_rows(s, student_temp)
            h = [-sum(a * math.log(b) for a, b in zip(pt, ps)) for pt, ps in zip(p_t, p_s)]
            total += sum(h) / len(h)
            pairs += 1
    return total / pairs


class Linear(nn.Module):
    """A deterministic stand-in for the head: flattens the image and maps it to ``K`` logits."""

    def __init__(self, in_dim: int, k: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def _teacher(k: int = 5, seed: int = 0, **settings: Any) -> dino.DINOTeacher:
    torch.manual_seed(seed)
    encoder = sslplug.ProjectorEncoder(nn.Identity(), 12, Linear(12, k), k)
    run = RunContext(config=RunConfig(), image_size=2, steps_per_epoch=10, total_steps=100)
    return dino.DINOTeacher(encoder, dino.DINOSettings(**settings), run)


def _global_views(n: int, seed: int = 1) -> sslplug.Views:
    g = torch.Generator().manual_seed(seed)
    return sslplug.Views(
        images=tuple(torch.randn(n, 3, 2, 2, generator=g) for _ in range(2)),
        groups=("global", "global"),
    )


# The loss and the centring ------------------------------------------------------------------


@pytest.mark.parametrize("student_temp", [0.1, 0.5])
def test_loss_matches_eq_3_written_out(student_temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 4, 6
    teacher_logits = torch.randn(2, n, k, generator=g)
    center = torch.randn(1, k, generator=g)
    student = tuple(torch.randn(n, k, generator=g) for _ in range(5))  # 2 global, 3 local
    views = sslplug.Views(
        images=tuple(torch.zeros(n, 3, 4, 4) for _ in range(5)),
        groups=("global", "global", "local", "local", "local"),
    )
    distribution = torch.softmax((teacher_logits - center) / 0.04, dim=-1)
    target = sslplug.Outputs(extras={"teacher_distribution": distribution})
    loss, metrics = dino.DINOLoss(student_temp)(sslplug.Outputs(projections=student), views, target)
    expected = reference_loss(
        teacher_logits.tolist(),
        center[0].tolist(),
        [s.tolist() for s in student],
        0.04,
        student_temp,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    entropy = -torch.special.xlogy(distribution, distribution).sum(-1).mean()
    assert metrics["teacher_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert 1 <= metrics["teacher_prototypes"].item() <= k
    pairs = [(i, j) for i in range(2) for j in range(5) if j != i]
    kl = sum(
        torch.nn.functional.kl_div(
            torch.log_softmax(student[j] / student_temp, dim=-1),
            distribution[i],
            reduction="batchmean",
        )
        for i, j in pairs
    ) / len(pairs)
    assert metrics["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)


def test_loss_pairs_follow_the_groups_not_the_positions() -> None:
    """Global crops after a local one: the teacher's n-th distribution pairs with every view but
    the n-th global crop."""
    g = torch.Generator().manual_seed(3)
    n, k = 3, 4
    student = tuple(torch.randn(n, k, generator=g) for _ in range(3))
    probs = torch.softmax(torch.randn(2, n, k, generator=g), dim=-1)
    loss = dino.dino_cross_entropy(probs, student, (1, 2), 0.1)
    pairs = [(0, 0), (0, 2), (1, 0), (1, 1)]  # (teacher crop, student view)
    expected = sum(
        -(probs[t] * torch.log_softmax(student[s] / 0.1, dim=-1)).sum(-1).mean() for t, s in pairs
    ) / len(pairs)
    torch.testing.assert_close(loss, expected)


def test_teacher_centres_and_sharpens_then_updates_the_centre_by_eq_4() -> None:
    teacher = _teacher(center_momentum=0.9, warmup_teacher_temp_epochs=0.0, teacher_temp=0.07)
    center = [0.0] * 5
    for step in range(3):
        views = _global_views(4, seed=step)
        out = teacher(views)
        logits = [teacher.network(v).tolist() for v in views.images]
        for crop, rows in enumerate(logits):
            centred = [[x - c for x, c in zip(row, center)] for row in rows]
            expected = torch.tensor(softmax_rows(centred, 0.07))
            torch.testing.assert_close(out.extras["teacher_distribution"][crop], expected)
        teacher.update_from_step(sslplug.Outputs(), views, out)
        flat = [row for rows in logits for row in rows]
        mean = [sum(col) / len(flat) for col in zip(*flat)]
        center = [0.9 * c + 0.1 * m for c, m in zip(center, mean)]
        torch.testing.assert_close(teacher.center[0], torch.tensor(center))
    assert "center" in teacher.state_dict()


def test_teacher_temperature_warms_up_linearly_over_epochs() -> None:
    teacher = _teacher(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    progress = teacher.run.progress  # 10 steps an epoch
    for step, expected in [(0, 0.04), (5, 0.0475), (10, 0.055), (20, 0.07), (90, 0.07)]:
        progress.step = step
        assert teacher.temperature() == pytest.approx(expected)


def test_teacher_moves_by_ema_with_a_cosine_rate() -> None:
    teacher = _teacher(momentum_teacher=0.9)
    student = sslplug.ProjectorEncoder(nn.Identity(), 12, Linear(12, 5), 5)
    before = teacher.network[1].linear.weight.clone()
    metrics = teacher.step(student, 0, 100)
    assert metrics["tau"] == pytest.approx(0.9)
    torch.testing.assert_close(
        teacher.network[1].linear.weight, 0.9 * before + 0.1 * student.projector.linear.weight
    )
    assert teacher.step(student, 100, 100)["tau"] == pytest.approx(1.0)
    assert not any(p.requires_grad for p in teacher.parameters())


# The head and the optimiser rules ------------------------------------------------------------


def _encoder(**settings: Any) -> dino.DINOEncoder:
    s = dino.DINOSettings(hidden_dim=16, bottleneck_dim=8, out_dim=32, **settings)
    backbone = SmallConvNet(width=4)
    return dino.DINOEncoder(backbone, backbone.out_dim, s, optim_weight_decay=1e-4)


def test_head_normalises_the_bottleneck_onto_unit_prototypes() -> None:
    encoder = _encoder()
    head = encoder.projector
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [16, 16, 8]
    assert any(isinstance(m, nn.GELU) for m in head.mlp)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 2  # use_bn_in_head
    plain = _encoder(use_bn_in_head=False).projector
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert head.last_layer.bias is None
    # |logit| <= 1: a unit bottleneck against unit prototype rows
    x = torch.randn(5, encoder.feature_dim)
    assert head(x).abs().max() <= 1.0 + 1e-5
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad  # norm_last_layer
    assert _encoder(
        norm_last_layer=False
    ).projector.last_layer.parametrizations.weight.original0.requires_grad


def test_optim_rules_freeze_the_last_layer_and_schedule_the_weight_decay_from_0_04_to_0_4() -> None:
    encoder = _encoder()
    rules = encoder.optim_rules()
    assert rules.clip_grad_norm == 3.0
    optimization = Optimization(
        OptimSettings(weight_decay=1e-4),
        [encoder],
        steps_per_epoch=5,
        total_steps=20,
        rules=[rules],
    )
    names = [g["name"] for g in optimization.optimizer.param_groups]
    assert names[:2] == ["decay", "no_decay"]
    assert not optimization.optimizer.param_groups[0]["params"]  # the student claims all
    assert {"student", "last_layer"} <= set(names)
    weights = [
        g for g in optimization.optimizer.param_groups if g["name"] in ("student", "last_layer")
    ]
    last = encoder.projector.last_layer.parametrizations.weight.original1
    for step in range(20):
        for p in encoder.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        before = last.detach().clone()
        optimization.step(step)
        expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * step / 19))
        for group in weights:
            if group["name"] == "student" or step >= 5:  # a frozen group takes no step
                assert group["weight_decay"] == pytest.approx(expected)
        assert torch.equal(last, before) == (step < 5)  # frozen during the first epoch


# Two gloo ranks ------------------------------------------------------------------------------

WORLD, ROWS, K = 2, 4, 5


def _whole_batch() -> tuple[sslplug.Views, tuple[Tensor, ...]]:
    views = _global_views(WORLD * ROWS, seed=7)
    g = torch.Generator().manual_seed(8)
    student = tuple(torch.randn(WORLD * ROWS, K, generator=g) for _ in range(3))
    return views, student


def _center_and_loss(views: sslplug.Views, student: tuple[Tensor, ...]) -> dict[str, Any]:
    teacher = _teacher(K)
    teacher.center.fill_(0.3)
    all_views = sslplug.Views(
        images=(*views.images, torch.zeros(views.batch_size, 3, 1, 1)),
        groups=("global", "global", "local"),
    )
    with torch.no_grad():
        target = teacher(views)
    student = tuple(s.clone().requires_grad_() for s in student)
    loss = dino.DINOLoss(0.1)(sslplug.Outputs(projections=student), all_views, target).loss
    loss.backward()
    teacher.update_from_step(sslplug.Outputs(projections=student), all_views, target)
    return {"loss": loss.detach(), "center": teacher.center, "grads": [s.grad for s in student]}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        views, student = _whole_batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        mine = sslplug.Views(images=tuple(v[rows] for v in views.images), groups=views.groups)
        torch.save(_center_and_loss(mine, tuple(s[rows] for s in student)), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo ranks in spawned processes
def test_two_ranks_centre_over_the_global_batch_as_one_process(tmp_path: Path) -> None:
    one = _center_and_loss(*_whole_batch())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for result in ranks:
        torch.testing.assert_close(result["center"], one["center"])
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), one["loss"])
    for r, result in enumerate(ranks):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        for got, whole in zip(result["grads"], one["grads"], strict=True):
            torch.testing.assert_close(got / WORLD, whole[rows])


# Through the engine --------------------------------------------------------------------------

BATCH, STEPS, EPOCHS, SIZE = 64, 3, 3, 32
ENGINE = [
    "components.plugin=dino",
    f"train.epochs={EPOCHS}",
    f"train.batch_size={BATCH}",
    f"train.max_steps_per_epoch={STEPS}",
    "train.log_every=1",
    'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
    "knn.baseline=false",
    "health.baseline=false",
    "knn.every=0",
    "health.every=0",
    "data.workers=0",
    "dino.warmup_teacher_temp_epochs=1",
    *NARROW,
]


def _shapes(views: sslplug.Views) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(image.shape) for image in views.images)


class Recorder:
    """Watches a run through the lifecycle hooks: the views the student and the teacher get,
    the metrics, and the encoder's state before training and after every epoch."""

    def __init__(self) -> None:
        self.student_views: list[tuple[tuple[int, ...], ...]] = []
        self.teacher_views: list[tuple[tuple[int, ...], ...]] = []
        self.metrics: list[dict[str, float]] = []
        self.encoder_states: list[dict[str, Tensor]] = []

    def _snapshot(self, run: RunContext) -> None:
        state = run.parts.encoder.state_dict()
        self.encoder_states.append({k: v.detach().clone() for k, v in state.items()})

    @sslplug.hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        parts = run.parts
        parts.encoder.register_forward_pre_hook(
            lambda module, args: self.student_views.append(_shapes(args[0]))
        )
        parts.target_update.register_forward_pre_hook(
            lambda module, args: self.teacher_views.append(_shapes(args[0]))
        )
        self._snapshot(run)

    @sslplug.hookimpl
    def sslplug_step_end(self, metrics: dict[str, float]) -> None:
        self.metrics.append(dict(metrics))

    @sslplug.hookimpl
    def sslplug_epoch_end(self, run: RunContext) -> None:
        self._snapshot(run)


def _registry(*extra: object) -> PluginRegistry:
    registry = PluginRegistry()
    registry.load_entry_points()
    for index, plugin in enumerate(extra):
        assert registry.register(plugin, f"extra{index}"), registry.failures
    return registry


def _train(out: Path, *extra: object, resume: Path | None = None) -> dict[str, Any]:
    registry = _registry(*extra)
    config = load_config(None, [*ENGINE, f"train.out={out}"], registry.settings_classes())
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit must reduce in the same order
    try:
        return train(config, registry, resume=resume)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorder, Path]:
    recorder = Recorder()
    out = tmp_path_factory.mktemp("dino") / "run"
    _train(out, recorder)
    return recorder, out


@pytest.mark.slow  # a run of nine steps on the default data
def test_run_on_the_default_data_logs_the_teacher(dino_run: tuple[Recorder, Path]) -> None:
    recorder, _ = dino_run
    assert len(recorder.metrics) == EPOCHS * STEPS
    assert all(math.isfinite(m["loss"]) for m in recorder.metrics)
    assert all(0 <= m["teacher_entropy"] <= math.log(128) for m in recorder.metrics)
    temperatures = [m["teacher_temperature"] for m in recorder.metrics]
    expected = [0.04 + 0.03 * min(1.0, step / STEPS) for step in range(EPOCHS * STEPS)]
    assert temperatures == pytest.approx(expected)


@pytest.mark.slow
def test_teacher_sees_only_the_global_crops(dino_run: tuple[Recorder, Path]) -> None:
    recorder, _ = dino_run
    global_crop, local_crop = (BATCH, 3, SIZE, SIZE), (BATCH, 3, 14, 14)
    assert recorder.student_views == [(global_crop,) * 2 + (local_crop,) * 2] * EPOCHS * STEPS
    assert recorder.teacher_views == [(global_crop,) * 2] * EPOCHS * STEPS


@pytest.mark.slow
def test_last_layer_is_frozen_during_the_first_epoch_only(dino_run: tuple[Recorder, Path]) -> None:
    states = dino_run[0].encoder_states  # before training, after epochs 1, 2, 3
    direction = "projector.prototypes.0.parametrizations.weight.original1"
    hidden = "projector.mlp.0.weight"
    assert torch.equal(states[0][direction], states[1][direction])
    assert not torch.equal(states[0][hidden], states[1][hidden])
    assert not torch.equal(states[1][direction], states[2][direction])
    assert not torch.equal(states[2][direction], states[3][direction])


@pytest.mark.slow  # two more runs of the same settings
def test_resume_is_bit_exact_centre_included(
    dino_run: tuple[Recorder, Path], tmp_path: Path
) -> None:
    _, straight_dir = dino_run
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _train(out, StopAfterEpoch(EPOCHS - 1))
    assert load_checkpoint(out)["epoch"] == EPOCHS - 1
    _train(out, resume=out)
    resumed, straight = load_checkpoint(out), load_checkpoint(straight_dir)
    assert resumed["step"] == straight["step"] == EPOCHS * STEPS
    assert straight["target_update"]["center"].abs().sum() > 0
    for component in ("encoder", "loss", "target_update"):
        assert resumed[component].keys() == straight[component].keys(), component
        for key, value in straight[component].items():
            assert torch.equal(resumed[component][key], value), f"{component}.{key}"


def _listening(registry: PluginRegistry) -> list[dict[str, float]]:
    logged: list[dict[str, float]] = []

    @sslplug.hookimpl
    def sslplug_step_end(metrics: dict[str, float]) -> None:
        logged.append(dict(metrics))

    plugin = types.ModuleType("loss_listener")
    plugin.sslplug_step_end = sslplug_step_end  # type: ignore[attr-defined]
    registry.register(plugin, "loss_listener")
    return logged


def _short_run(
    registry: PluginRegistry, out: Path, *choice: str, steps: int
) -> list[dict[str, float]]:
    logged = _listening(registry)
    config = load_config(
        None,
        [
            *choice,
            *NARROW,
            "train.epochs=1",
            f"train.max_steps_per_epoch={steps}",
            "train.batch_size=32",
            "train.log_every=1",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "data.workers=0",
            f"train.out={out}",
        ],
        registry.settings_classes(),
    )
    train(config, registry)
    return logged


@pytest.mark.slow  # 16 steps on the default data
def test_student_approaches_the_teacher_on_the_default_data(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    """The loss is the teacher's entropy plus the student's KL divergence from the teacher; the
    entropy rises while the teacher's temperature warms up, and the KL falls."""
    metrics = _short_run(registry, tmp_path / "run", "components.plugin=dino", steps=16)
    kl = [m["kl"] for m in metrics]
    for m in metrics:
        assert m["loss"] == pytest.approx(m["teacher_entropy"] + m["kl"], rel=1e-4)
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert last < first, f"the student's KL from the teacher did not fall: {first} -> {last}"


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("dino.student_temp=0", "student_temp must be greater than 0, got 0"),
        ("dino.center_momentum=1.5", "center_momentum must be between 0 and 1, got 1.5"),
        ("dino.global_crops_scale=[0.5, 0.2]", "global_crops_scale must be a range"),
        ("dino.blur_prob=[1.0, 0.1]", "blur_prob must be a list of 3 values"),
        ("dino.solarize_prob=[0.0, 2.0, 0.0]", "solarize_prob must be between 0 and 1, got 2.0"),
        ("dino.out_dim=0", "out_dim must be greater than 0, got 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(
    registry: PluginRegistry, setting: str, shown: str
) -> None:
    with pytest.raises(ConfigError, match=shown.replace("[", r"\[")):
        load_config(None, ["components.plugin=dino", setting], registry.settings_classes())


# Mixes ---------------------------------------------------------------------------------------


@pytest.mark.slow  # 10 steps on the default data
def test_simclr_loss_trains_on_dinos_multi_crop_views(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    logged = _short_run(
        registry,
        tmp_path / "run",
        "components.plugin=simclr",
        "components.augmentation=dino",
        "simclr.projector_hidden_dim=64",
        steps=10,
    )
    losses = [m["loss"] for m in logged]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def _build(registry: PluginRegistry, *choice: str) -> Any:
    config = load_config(None, [*choice, *NARROW], registry.settings_classes())
    backbone, dim = build_backbone("small", SIZE)
    return registry.build(config, RunContext(config=config, image_size=SIZE), backbone, dim)


def test_dino_on_two_ungrouped_views_makes_both_teacher_crops(registry: PluginRegistry) -> None:
    """After SimCLR's augmentation every view counts as global: DINO without multi-crop."""
    parts = _build(registry, "components.plugin=dino", "components.augmentation=simclr")
    views = parts.views(torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8))
    assert views.indices("global") == (0, 1)
    with torch.no_grad():
        target = parts.target_update(views.select(parts.target_update.reads))
    assert target.extras["teacher_distribution"].shape == (2, 4, 128)


def test_a_rotation_encoder_with_the_dino_loss_is_refused_naming_both(
    registry: PluginRegistry,
) -> None:
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "components.plugin=rotnet", "components.loss=dino")
    message = str(info.value)
    assert "the loss from plugin 'dino' requires" in message
    assert "dino_teacher_distribution" in message
    assert "encoder from 'rotnet'" in message


def test_dino_registers_its_own_capability(registry: PluginRegistry) -> None:
    assert [c.name for c in registry.capabilities_of("dino")] == ["dino_teacher_distribution"]
    with pytest.raises(ComponentMismatchError, match="requires dino_teacher_distribution"):
        _build(registry, "components.plugin=dino", "components.target_update=none")
