"""SwAV: Sinkhorn-Knopp and the swapped prediction against reference formulas, the queue, the
prototypes' rules, two gloo ranks against one process, resume, training and mixes."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sslplug_methods import swav

import sslplug
from sslplug import Outputs, Views
from sslplug.checkpoint import load_checkpoint
from sslplug.config import Progress, RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.nn import build_backbone
from sslplug.plugins import PluginRegistry

from .harness import StopAfterEpoch

# reference formulas ---------------------------------------------------------------------------


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Eq. 5 of Caron et al. 2020 in its scaling-vector form, in float64: ``Q = diag(u) P
    diag(v)`` with ``P = exp(C^T Z / eps)`` (``K x B``), ``u = (1/K) / (P v)`` and ``v = (1/B) /
    (P^T u)`` in turn from ``v = 1``; the columns of ``Q``, rescaled to sum to 1, are the
    codes. Returned before that rescale, as ``K x B``."""
    p = torch.exp(scores.double() / epsilon).t()
    k, b = p.shape
    v = torch.ones(b, dtype=torch.float64)
    for _ in range(iterations):
        u = (1.0 / k) / (p @ v)
        v = (1.0 / b) / (p.t() @ u)
    return u[:, None] * p * v[None, :]


def reference_swapped_loss(
    z: list[torch.Tensor], prototypes: torch.Tensor, codes: dict[int, torch.Tensor], t: float
) -> float:
    """Eq. 1-2 with plain loops in float64: ``-sum_k q_s^k log p_t^k`` averaged over samples,
    over the crops ``t != s`` and over the crops ``s`` with codes."""
    c = F.normalize(prototypes.double(), dim=1)
    total = 0.0
    for s, q in codes.items():
        per_view = []
        for v, zv in enumerate(z):
            if v == s:
                continue
            logits = F.normalize(zv.double(), dim=1) @ c.t() / t
            log_p = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
            per_view.append(float(-(q.double() * log_p).sum(dim=1).mean()))
        total += sum(per_view) / len(per_view)
    return total / len(codes)


def _run(epoch: int = 0) -> RunContext:
    config = load_config(None, [])
    run = RunContext(config=config, image_size=32)
    run.progress = Progress(step=epoch * 10, epoch=epoch, steps_per_epoch=10, total_steps=100)
    return run


def _settings(**kwargs: Any) -> swav.SwAVSettings:
    return swav.SwAVSettings(**{"prototypes": 12, "queue_length": 0, **kwargs})


def _views(n: int, sizes: tuple[int, ...] = (8, 8, 4)) -> Views:
    groups = ("global", "global") + ("local",) * (len(sizes) - 2)
    return Views(images=tuple(torch.zeros(n, 3, s, s) for s in sizes), groups=groups)


# Sinkhorn-Knopp --------------------------------------------------------------------------------


def test_sinkhorn_knopp_matches_the_scaling_vector_form():
    scores = F.normalize(torch.randn(20, 8), dim=1) @ F.normalize(torch.randn(30, 8), dim=1).t()
    codes = sslplug.sinkhorn_knopp(scores, temperature=0.05, iterations=3)
    reference = reference_sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(
        codes.double(), (reference / reference.sum(dim=0)).t(), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("iterations", [1, 3, 50])
def test_sinkhorn_knopp_marginals_before_the_final_rescale(iterations):
    """Before the codes are rescaled (codes / B), every column (sample) of Q sums to 1/B, which
    the last step of each iteration makes exact, and every row (prototype) sums to the
    reference's row sums, which tend to 1/K as the iterations go on."""
    b, k = 64, 10
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(b, 16, generator=g), torch.randn(k, 16, generator=g)
    scores = F.normalize(z, dim=1) @ F.normalize(c, dim=1).t()
    q = sslplug.sinkhorn_knopp(scores, temperature=0.05, iterations=iterations).t() / b  # K x B
    reference = reference_sinkhorn(scores, 0.05, iterations)
    torch.testing.assert_close(q.sum(dim=0), torch.full((b,), 1.0 / b), rtol=1e-5, atol=0)
    torch.testing.assert_close(q.double(), reference, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(q.sum(dim=1).double(), reference.sum(dim=1), rtol=1e-4, atol=0)


def test_sinkhorn_knopp_rows_approach_one_over_k():
    b, k = 64, 10
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(b, 16, generator=g), torch.randn(k, 16, generator=g)
    scores = F.normalize(z, dim=1) @ F.normalize(c, dim=1).t()
    off = []
    for iterations in (1, 3, 50):
        rows = sslplug.sinkhorn_knopp(scores, 0.05, iterations).sum(dim=0) / b
        off.append((rows * k - 1).abs().max().item())
    assert off == sorted(off, reverse=True), off
    assert off[-1] < 1e-4, off


def test_sinkhorn_knopp_spreads_a_collapsed_batch_over_the_prototypes():
    """Every sample nearest to prototype 0: the codes still use every prototype equally."""
    scores = torch.full((40, 4), -0.5)
    scores[:, 0] = 1.0
    scores += 0.01 * torch.randn(40, 4)
    codes = sslplug.sinkhorn_knopp(scores, temperature=0.05, iterations=50)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((4,), 10.0), rtol=1e-3, atol=0)


# the swapped prediction ------------------------------------------------------------------------


def test_swapped_prediction_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    n, k = 6, 5
    scores = tuple(torch.randn(n, k, generator=g) for _ in range(4))
    codes = {0: torch.softmax(torch.randn(n, k, generator=g), 1), 1: torch.rand(n, k, generator=g)}
    loss = swav.swapped_prediction(scores, codes, temperature=0.1)
    expected = 0.0
    for s, q in codes.items():
        terms = [F.cross_entropy(scores[t] / 0.1, q) for t in range(4) if t != s]
        expected += sum(terms) / 3
    assert loss.item() == pytest.approx(float(expected) / 2, rel=1e-5)


def test_loss_matches_the_reference_formula_over_multi_crop_views():
    torch.manual_seed(0)
    n, dim = 16, 8
    loss_fn = swav.SwAVLoss(dim, _settings(), _run())
    prototypes = loss_fn.prototypes.weight.detach().clone()
    z = [torch.randn(n, dim) for _ in range(4)]
    result = loss_fn(Outputs(projections=tuple(z)), _views(n, (8, 8, 4, 4)), None)
    c = F.normalize(prototypes, dim=1)
    codes = {}
    for s in (0, 1):
        q = reference_sinkhorn(F.normalize(z[s], dim=1) @ c.t(), 0.05, 3)
        codes[s] = (q / q.sum(dim=0)).t()
    expected = reference_swapped_loss(z, prototypes, codes, 0.1)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.metrics["queue_used"].item() == 0.0


def test_prototypes_are_normalised_before_each_step_and_codes_carry_no_gradient():
    n, dim = 8, 6
    loss_fn = swav.SwAVLoss(dim, _settings(), _run())
    with torch.no_grad():
        loss_fn.prototypes.weight.mul_(3.0)
    z = [torch.randn(n, dim, requires_grad=True) for _ in range(3)]
    loss_fn(Outputs(projections=tuple(z)), _views(n), None).loss.backward()
    norms = loss_fn.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z)
    assert loss_fn.prototypes.weight.grad is not None


def test_codes_come_from_the_first_two_global_crops_whatever_their_position():
    n, dim = 8, 6
    loss_fn = swav.SwAVLoss(dim, _settings(), _run())
    z = [torch.randn(n, dim) for _ in range(3)]
    views = Views(
        images=tuple(torch.zeros(n, 3, 4, 4) for _ in z), groups=("local", "global", "global")
    )
    loss = loss_fn(Outputs(projections=tuple(z)), views, None).loss
    reordered = swav.SwAVLoss(dim, _settings(), _run())
    reordered.load_state_dict(loss_fn.state_dict())
    same = reordered(Outputs(projections=(z[1], z[2], z[0])), _views(n), None).loss
    torch.testing.assert_close(loss, same)


def test_loss_refuses_views_with_fewer_than_two_global_crops():
    loss_fn = swav.SwAVLoss(4, _settings(), _run())
    views = Views(images=(torch.zeros(2, 3, 4, 4),) * 2, groups=("global", "local"))
    with pytest.raises(ValueError, match="2 global crops"):
        loss_fn(Outputs(projections=(torch.randn(2, 4), torch.randn(2, 4))), views, None)


# the queue -------------------------------------------------------------------------------------


def test_queue_fills_from_its_start_epoch_and_joins_the_codes_once_full():
    n, dim = 4, 6
    run = _run(epoch=0)
    loss_fn = swav.SwAVLoss(dim, _settings(queue_length=8, epoch_queue_starts=1), run)
    steps = [[torch.randn(n, dim) for _ in range(3)] for _ in range(4)]

    loss_fn(Outputs(projections=tuple(steps[0])), _views(n), None)
    assert int(loss_fn.queue_filled) == 0 and not loss_fn.queue.any()  # before its epoch

    run.progress = Progress(step=10, epoch=1, steps_per_epoch=10, total_steps=100)
    used = [
        loss_fn(Outputs(projections=tuple(z)), _views(n), None).metrics["queue_used"]
        for z in steps[1:3]
    ]
    assert [u.item() for u in used] == [0.0, 0.0]  # filling: 4 then 8 of 8 rows
    for slot in (0, 1):  # newest first, per assigned crop
        expected = torch.cat(
            [F.normalize(steps[2][slot], dim=1), F.normalize(steps[1][slot], dim=1)]
        )
        torch.testing.assert_close(loss_fn.queue[slot], expected)

    queue = loss_fn.queue.clone()
    prototypes = F.normalize(loss_fn.prototypes.weight.detach(), dim=1)
    z = steps[3]
    result = loss_fn(Outputs(projections=tuple(z)), _views(n), None)
    assert result.metrics["queue_used"].item() == 1.0
    codes = {}
    for s in (0, 1):
        scores = torch.cat([queue[s], F.normalize(z[s], dim=1)]) @ prototypes.t()
        q = reference_sinkhorn(scores, 0.05, 3)
        codes[s] = (q / q.sum(dim=0)).t()[-n:]
    expected = reference_swapped_loss(z, prototypes, codes, 0.1)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(loss_fn.queue[0, :n], F.normalize(z[0], dim=1))


def test_queue_is_left_alone_in_eval_mode():
    loss_fn = swav.SwAVLoss(6, _settings(queue_length=8, epoch_queue_starts=0), _run()).eval()
    loss_fn(Outputs(projections=tuple(torch.randn(4, 6) for _ in range(3))), _views(4), None)
    assert int(loss_fn.queue_filled) == 0


def test_prototypes_are_a_frozen_parameter_group():
    loss_fn = swav.SwAVLoss(6, _settings(freeze_prototypes_epochs=1.5), _run())
    (group,) = loss_fn.optim_rules().groups
    assert group.trainable() == [loss_fn.prototypes.weight]
    assert group.frozen_epochs == 1.5


# settings, views, encoder ---------------------------------------------------------------------


def test_views_are_two_global_and_six_local_crops_of_swav_scales():
    settings = swav.SwAVSettings()
    augmentations = swav.sslplug_augmentation(settings, RunContext(load_config(), image_size=32))
    assert augmentations.groups == ("global", "global") + ("local",) * 6
    generator = sslplug.MultiViewGenerator(augmentations)  # the default views
    views = generator(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8))
    assert [tuple(v.shape) for v in views.images] == [(5, 3, 32, 32)] * 2 + [(5, 3, 14, 14)] * 6
    assert {"two_views", "view_groups"} <= generator.provides
    scales = [tuple(map(float, p[0].scale)) for p in augmentations]
    assert scales == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    jitter = augmentations[0][2]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == pytest.approx(
        (0.8, 0.8, 0.8, 0.2)
    )
    blur = [type(m).__name__ for m in augmentations[0]]
    assert "RandomGaussianBlur" not in blur  # 32 px: no blur (blur="auto")
    large = swav.sslplug_augmentation(settings, RunContext(load_config(), image_size=96))
    assert "RandomGaussianBlur" in [type(m).__name__ for m in large[0]]


def test_encoder_projects_every_crop():
    backbone, dim = build_backbone("small", 32)
    encoder = swav.SwAVEncoder(backbone, dim, swav.SwAVSettings())
    out = encoder(_views(3, (32, 32, 14)))
    assert [tuple(p.shape) for p in out.projections] == [(3, 128)] * 3
    assert encoder.projector[0].out_features == dim  # hidden width: the backbone's


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("swav.temperature=0", "temperature"),
        ("swav.epsilon=-0.05", "epsilon"),
        ("swav.sinkhorn_iterations=0", "sinkhorn_iterations"),
        ("swav.prototypes=0", "prototypes"),
        ("swav.queue_length=-1", "queue_length"),
        ("swav.global_scale=[0.5, 0.2]", "global_scale"),
        ("swav.jitter_prob=1.5", "jitter_prob"),
        ("swav.freeze_prototypes_epochs=-1", "freeze_prototypes_epochs"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(registry, assignment, named):
    value = assignment.split("=", 1)[1].strip("[]").split(",")[0]
    with pytest.raises(ConfigError, match=named) as info:
        load_config(None, [assignment], registry.settings_classes())
    assert value in str(info.value)


# two gloo ranks against one process ------------------------------------------------------------

WORLD = 2
ROWS, DIM, K, QUEUE = 8, 6, 5, 8  # rows per rank


def _queued_loss() -> swav.SwAVLoss:
    settings = _settings(prototypes=K, queue_length=QUEUE, epoch_queue_starts=0)
    return swav.SwAVLoss(DIM, settings, _run())


def _inputs() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Three views of the whole batch, and the loss's state: unit prototypes and a full queue."""
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(WORLD * ROWS, DIM, generator=g) for _ in range(3)]
    loss_fn = _queued_loss()
    with torch.no_grad():
        loss_fn.prototypes.weight.copy_(F.normalize(torch.randn(K, DIM, generator=g), dim=1))
        loss_fn.queue.copy_(F.normalize(torch.randn(2, QUEUE, DIM, generator=g), dim=-1))
        loss_fn.queue_filled.fill_(QUEUE)
    return z, loss_fn.state_dict()


def _step(z: list[torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One step of the loss with the queue in use: its codes, loss, gradients and new queue."""
    loss_fn = _queued_loss()
    loss_fn.load_state_dict(state)
    z = [v.clone().requires_grad_() for v in z]
    codes = [
        loss_fn.codes(loss_fn.prototypes(F.normalize(v.detach(), dim=1)), slot, use_queue=True)
        for slot, v in enumerate(z[:2])
    ]
    result = loss_fn(Outputs(projections=tuple(z)), _views(z[0].shape[0]), None)
    result.loss.backward()
    return {
        "loss": result.loss.detach(),
        "queue_used": result.metrics["queue_used"],
        "codes": torch.stack(codes),
        "grads": torch.stack([v.grad for v in z]),
        "prototypes_grad": loss_fn.prototypes.weight.grad,
        "queue": loss_fn.queue.clone(),
    }


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        z, state = _inputs()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.save(_step([v[rows] for v in z], state), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo ranks in spawned processes
def test_two_ranks_give_the_codes_and_gradients_of_one_process_with_the_whole_batch(tmp_path):
    """With the queue in use: each rank's codes are those of its rows in one process with the
    whole batch and the whole queue, the losses average to the whole batch's, the gradients
    (divided by the world size, as DDP averages) agree, and every rank ends with the queue of
    the one process."""
    whole = _step(*_inputs())
    assert whole["queue_used"].item() == 1.0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), whole["loss"])
    for r, result in enumerate(ranks):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        assert result["queue_used"].item() == 1.0
        torch.testing.assert_close(result["codes"], whole["codes"][:, rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            result["grads"] / WORLD, whole["grads"][:, rows], rtol=1e-4, atol=1e-7
        )
        assert torch.equal(result["queue"], whole["queue"])
    # DDP averages the prototypes' gradients over the ranks
    mean = torch.stack([r["prototypes_grad"] for r in ranks]).mean(dim=0)
    torch.testing.assert_close(mean, whole["prototypes_grad"], rtol=1e-4, atol=1e-7)
    # the sums ran over both ranks: rank 0's rows alone would give other codes
    z, state = _inputs()
    alone = sslplug.sinkhorn_knopp(
        F.normalize(z[0][:ROWS], dim=1) @ state["prototypes.weight"].t(), 0.05, 3
    )
    assert not torch.allclose(alone, ranks[0]["codes"][0], atol=1e-3)


# through the engine ----------------------------------------------------------------------------

BATCH, STEPS, EPOCHS = 32, 3, 3
# a queue of two batches, filled from the second epoch: full after its second step, then used
SMALL = [
    "swav.prototypes=64",
    "swav.local_crops=2",
    "swav.queue_length=64",
    "swav.epoch_queue_starts=1",
]


def _common(out: Path) -> list[str]:
    return [
        "components.plugin=swav",
        f"train.out={out}",
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
        *SMALL,
    ]


class Watcher:
    """A lifecycle plugin keeping the metrics of every step and the loss's state after every
    epoch (``states[0]``: before the first step)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def _snapshot(self, run: RunContext) -> None:
        loss = run.parts.loss
        self.states.append({k: v.detach().clone() for k, v in loss.state_dict().items()})

    @sslplug.hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        self._snapshot(run)

    @sslplug.hookimpl
    def sslplug_step_end(self, metrics: dict[str, float]) -> None:
        self.metrics.append(dict(metrics))

    @sslplug.hookimpl
    def sslplug_epoch_end(self, run: RunContext) -> None:
        self._snapshot(run)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(out: Path, *plugins: object, resume: bool = False) -> dict[str, Any]:
    registry = PluginRegistry()
    registry.load_entry_points()
    for index, plugin in enumerate(plugins):
        assert registry.register(plugin, f"extra{index}"), registry.failures
    config = load_config(None, _common(out), registry.settings_classes())
    with _one_thread():
        return train(config, registry, resume=out if resume else None)


@pytest.fixture(scope="module")
def swav_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Watcher]:
    out = tmp_path_factory.mktemp("swav") / "run"
    watcher = Watcher()
    _train(out, watcher)
    return out, watcher


@pytest.mark.slow  # a run of nine steps through the engine
def test_run_uses_the_queue_once_full_and_freezes_the_prototypes_for_an_epoch(swav_run):
    _, watcher = swav_run
    used = [m["queue_used"] for m in watcher.metrics]
    assert used == [0.0] * 3 + [0.0, 0.0, 1.0] + [1.0] * 3
    assert all(math.isfinite(m["loss"]) for m in watcher.metrics)
    before, first, second = (s["prototypes.weight"] for s in watcher.states[:3])
    # epoch 1: normalised before every step but not trained
    torch.testing.assert_close(first, F.normalize(before, dim=1))
    assert not torch.allclose(second, first)  # trained from epoch 2 on
    assert int(watcher.states[-1]["queue_filled"]) == 6 * BATCH


@pytest.mark.slow  # two more runs through the engine
def test_resume_with_the_queue_in_use_is_bit_exact(swav_run, tmp_path):
    straight_out, _ = swav_run
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _train(out, StopAfterEpoch(EPOCHS - 1))
    assert load_checkpoint(out)["epoch"] == EPOCHS - 1
    _train(out, resume=True)
    resumed, straight = load_checkpoint(out), load_checkpoint(straight_out)
    assert resumed["step"] == straight["step"] == EPOCHS * STEPS
    assert straight["loss"]["queue"].abs().sum() > 0
    for component in ("views", "encoder", "loss"):
        assert resumed[component].keys() == straight[component].keys(), component
        for key, value in straight[component].items():
            assert torch.equal(resumed[component][key], value), f"{component}.{key}"


def _losses(registry: PluginRegistry, out: Path, choice: list[str]) -> tuple[dict, list[float]]:
    watcher = Watcher()
    registry.register(watcher, "watcher")
    config = load_config(
        None,
        [
            *choice,
            *SMALL,
            f"train.out={out}",
            "train.epochs=1",
            "train.max_steps_per_epoch=12",
            "train.batch_size=32",
            "train.log_every=1",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "data.workers=0",
            "swav.freeze_prototypes_epochs=0",
            "simclr.projector_hidden_dim=64",
        ],
        registry.settings_classes(),
    )
    summary = train(config, registry)
    return summary, [m["loss"] for m in watcher.metrics]


@pytest.mark.slow  # twelve steps on the default data, per mix
@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (["components.plugin=swav"], {"views": "swav", "loss": "swav"}),
        (
            ["components.plugin=simclr", "components.loss=swav"],
            {"views": "simclr", "encoder": "simclr", "loss": "swav"},
        ),
        (
            ["components.plugin=simclr", "components.augmentation=swav", "components.views=swav"],
            {"augmentation": "swav", "views": "swav", "loss": "simclr"},
        ),
    ],
    ids=["swav", "simclr+swav-loss", "simclr+swav-multicrop"],
)
def test_trains_on_the_default_data_and_the_loss_falls(registry, tmp_path, choice, expected):
    summary, losses = _losses(registry, tmp_path / "run", choice)
    assert summary["data"] == "shapes"
    assert {k: summary["components"][k] for k in expected} == expected
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"the loss did not fall: {first:.4f} -> {last:.4f}"


def _build(registry: PluginRegistry, choice: list[str]) -> Any:
    config = load_config(None, choice, registry.settings_classes())
    backbone, dim = build_backbone("small", 32)
    run = RunContext(config=config, image_size=32)
    run.components = registry.resolve(config)  # as the engine sets it before building
    return registry.build(config, run, backbone, dim)


def test_swav_views_with_a_pretext_loss_are_refused_naming_both_plugins(registry):
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, ["components.plugin=swav", "components.loss=rotnet"])
    message = str(info.value)
    assert "the loss from plugin 'rotnet' requires" in message and "rotation_labels" in message
    assert "views from 'swav'" in message


def test_swav_loss_after_an_encoder_without_projections_is_refused_naming_both(registry):
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, ["components.plugin=rotnet", "components.loss=swav"])
    message = str(info.value)
    assert "plugin 'swav'" in message and "encoder from plugin 'rotnet'" in message
