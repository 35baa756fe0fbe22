"""NNCLR: the nearest-neighbour lookup and the support set against brute-force references, the
loss against eq. 2 written out, two gloo ranks against one process with the whole batch, a short
run on the default data, bit-exact resume, settings refused, and mixes with other plugins."""

from __future__ import annotations

import contextlib
import math
import os
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sslplug_methods import nnclr

import sslplug
from sslplug import Outputs, Views
from sslplug.checkpoint import load_checkpoint
from sslplug.config import RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.nn import SmallConvNet, build_backbone
from sslplug.plugins import PluginRegistry

from .harness import StopAfterEpoch

NARROW = [
    "nnclr.projector_hidden_dim=128",
    "nnclr.predictor_hidden_dim=128",
    "nnclr.projection_dim=64",
]


def _unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


def _filled(size: int, dim: int, rows: torch.Tensor) -> nnclr.SupportSet:
    support = nnclr.SupportSet(size, dim)
    support.push(rows)
    return support


# The support set --------------------------------------------------------------------------------


def test_nearest_neighbour_matches_a_brute_force_search():
    g = torch.Generator().manual_seed(0)
    rows, queries = _unit_rows(50, 8, g), _unit_rows(12, 8, g)
    support = _filled(64, 8, rows)  # 50 of 64 rows filled: the 14 zero rows must not be chosen
    found = support.nearest(queries)
    for query, neighbour in zip(queries.tolist(), found.tolist()):
        scores = [sum(a * b for a, b in zip(query, row)) for row in rows.tolist()]
        best = max(range(len(scores)), key=scores.__getitem__)
        assert neighbour == pytest.approx(rows[best].tolist())


def test_an_empty_support_set_gives_each_projection_as_its_own_neighbour():
    z = _unit_rows(4, 8, torch.Generator().manual_seed(1)).requires_grad_()
    neighbour = nnclr.SupportSet(16, 8).nearest(z)
    assert torch.equal(neighbour, z.detach()) and not neighbour.requires_grad


def test_support_set_is_a_fifo_queue_that_wraps_around():
    g = torch.Generator().manual_seed(2)
    support = nnclr.SupportSet(10, 3)
    reference: list[list[float]] = [[0.0] * 3 for _ in range(10)]
    written = 0
    for n in (4, 4, 4, 13):  # the last batch is larger than the support set
        batch = torch.randn(n, 3, generator=g)
        for row in batch.tolist()[-10:]:
            reference[written % 10] = row
            written += 1
        support.push(batch)
        assert torch.equal(support.embeddings, torch.tensor(reference))
        assert int(support.pointer) == written % 10
    assert int(support.filled) == 10


def test_support_set_counts_filled_rows_until_full():
    support = nnclr.SupportSet(10, 3)
    filled = []
    for _ in range(4):
        support.push(torch.ones(3, 3))
        filled.append(int(support.filled))
    assert filled == [3, 6, 9, 10]


# The loss --------------------------------------------------------------------------------------


def reference_loss(nn1, nn2, p1, p2, temperature):
    """Eq. 2 of Dwibedi et al. written out, one image at a time, both directions averaged."""

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def one(neighbours, predictions):
        neighbours = [unit(v) for v in neighbours.tolist()]
        predictions = [unit(v) for v in predictions.tolist()]
        total = 0.0
        for i, q in enumerate(neighbours):
            scores = [sum(a * b for a, b in zip(q, p)) / temperature for p in predictions]
            total += -scores[i] + math.log(sum(math.exp(s) for s in scores))
        return total / len(neighbours)

    return (one(nn1, p2) + one(nn2, p1)) / 2


def _outputs(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1, z2, p1, p2 = (torch.randn(n, d, generator=g) for _ in range(4))
    return Outputs(projections=(z1, z2), predictions=(p1, p2))


def _views(n=6):
    return Views(images=(torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))


def _brute_force_neighbours(z, rows):
    z = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in z.tolist()]
    out = []
    for query in z:
        scores = [sum(a * b for a, b in zip(query, row)) for row in rows.tolist()]
        out.append(rows[max(range(len(scores)), key=scores.__getitem__)])
    return torch.stack(out)


def test_loss_matches_reference_formula_and_fills_the_support_set_after():
    g = torch.Generator().manual_seed(3)
    rows = _unit_rows(20, 5, g)
    loss_fn = nnclr.NNCLRLoss(temperature=0.1, support_set_size=32, dim=5)
    loss_fn.support_set.push(rows)
    outputs = _outputs()
    z1, z2 = outputs.projections
    p1, p2 = outputs.predictions
    loss, metrics = loss_fn(outputs, _views(), None)

    nn1, nn2 = _brute_force_neighbours(z1, rows), _brute_force_neighbours(z2, rows)
    assert loss.item() == pytest.approx(reference_loss(nn1, nn2, p1, p2, 0.1), rel=1e-5)
    cosine = (F.cosine_similarity(nn1, z1).mean() + F.cosine_similarity(nn2, z2).mean()) / 2
    assert metrics["neighbour_cosine"].item() == pytest.approx(cosine.item(), rel=1e-5)
    # after the loss: the first view's normalised projections follow the 20 earlier rows
    torch.testing.assert_close(loss_fn.support_set.embeddings[20:26], F.normalize(z1, dim=1))
    assert int(loss_fn.support_set.pointer) == 26 and int(loss_fn.support_set.filled) == 26


def test_loss_in_eval_mode_leaves_the_support_set_alone():
    loss_fn = nnclr.NNCLRLoss(temperature=0.1, support_set_size=32, dim=5)
    loss_fn.support_set.push(torch.randn(12, 5))
    before = {k: v.clone() for k, v in loss_fn.support_set.state_dict().items()}
    loss_fn.eval()(_outputs(), _views(), None)
    after = loss_fn.support_set.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    loss_fn.train()(_outputs(), _views(), None)
    assert int(loss_fn.support_set.filled) == 18


def test_loss_is_low_when_each_prediction_points_at_its_neighbour():
    g = torch.Generator().manual_seed(4)
    rows = _unit_rows(8, 16, g)
    loss_fn = nnclr.NNCLRLoss(temperature=0.1, support_set_size=8, dim=16)
    loss_fn.support_set.push(rows)
    z1, z2 = rows[:4] + 0.01, rows[4:] + 0.01  # each projection's neighbour is its own row
    matched = Outputs(projections=(z1, z2), predictions=(3 * rows[4:], 0.5 * rows[:4]))
    loss, _ = loss_fn(matched, _views(4), None)
    scrambled = Outputs(projections=(z1, z2), predictions=(rows[:4], rows[4:]))
    loss_fn.support_set.push(rows)  # back to the same rows
    worse, _ = loss_fn(scrambled, _views(4), None)
    assert loss.item() < worse.item()


def test_gradient_reaches_the_predictions_only():
    outputs = _outputs()
    z1, z2 = (z.clone().requires_grad_() for z in outputs.projections)
    p1, p2 = (p.clone().requires_grad_() for p in outputs.predictions)
    loss_fn = nnclr.NNCLRLoss(temperature=0.1, support_set_size=32, dim=5)
    loss_fn.support_set.push(torch.randn(12, 5))
    loss, _ = loss_fn(Outputs(projections=(z1, z2), predictions=(p1, p2)), _views(), None)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # the neighbour is a constant
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None and p2.grad.abs().sum() > 0


def test_encoder_gives_projection_and_prediction_per_view():
    settings = nnclr.NNCLRSettings(
        projector_hidden_dim=16, predictor_hidden_dim=16, projection_dim=8
    )
    backbone = SmallConvNet(width=4)
    encoder = nnclr.NNCLREncoder(backbone, backbone.out_dim, settings)
    out = encoder(Views(images=(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))))
    assert [t.shape for t in out.projections] == [(4, 8), (4, 8)]
    assert [t.shape for t in out.predictions] == [(4, 8), (4, 8)]
    linears = [m for m in encoder.projector if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 8]  # the paper's 3-layer projector
    assert isinstance(encoder.projector[-1], torch.nn.BatchNorm1d)


def test_defaults_are_the_published_recipe():
    settings = nnclr.NNCLRSettings()
    assert settings.temperature == 0.1
    assert (settings.projector_hidden_dim, settings.projection_dim) == (2048, 256)
    assert settings.predictor_hidden_dim == 4096
    assert settings.blur_prob == (0.0, 0.0) and settings.solarize_prob == (0.0, 0.2)


# Two ranks against one process -----------------------------------------------------------------

WORLD = 2
ROWS, DIM, SUPPORT = 8, 16, 40  # rows per rank; 24 support rows filled before the step


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return (
        _unit_rows(24, DIM, g),
        *(torch.randn(WORLD * ROWS, DIM, generator=g) for _ in range(4)),
    )


def _step(rows, z1, z2, p1, p2):
    loss_fn = nnclr.NNCLRLoss(temperature=0.1, support_set_size=SUPPORT, dim=DIM)
    loss_fn.support_set.push(rows)
    loss, _ = loss_fn(Outputs(projections=(z1, z2), predictions=(p1, p2)), _views(len(z1)), None)
    loss.backward()
    return loss.detach(), loss_fn.support_set.state_dict()


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows, *whole = _inputs()
        z1, z2, p1, p2 = (t[rank * ROWS : (rank + 1) * ROWS].clone() for t in whole)
        p1.requires_grad_(), p2.requires_grad_()
        # each rank pushes half the earlier rows; gathered, they fill every rank's support set
        # as the one process's
        loss, support = _step(rows[rank * 12 : (rank + 1) * 12].clone(), z1, z2, p1, p2)
        torch.save({"loss": loss, "g1": p1.grad, "g2": p2.grad, **support}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo ranks in spawned processes
def test_two_ranks_match_one_process_with_the_whole_batch(tmp_path: Path):
    rows, z1, z2, p1, p2 = _inputs()
    p1.requires_grad_(), p2.requires_grad_()
    loss, support = _step(rows, z1, z2, p1, p2)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss)
    for r, result in enumerate(ranks):
        rows_of_rank = slice(r * ROWS, (r + 1) * ROWS)
        assert p1.grad is not None and p2.grad is not None
        torch.testing.assert_close(
            result["g1"] / WORLD, p1.grad[rows_of_rank], atol=1e-6, rtol=1e-4
        )
        torch.testing.assert_close(
            result["g2"] / WORLD, p2.grad[rows_of_rank], atol=1e-6, rtol=1e-4
        )
        # every rank's support set holds the whole batch's first views, as one process's does
        for key in ("embeddings", "pointer", "filled"):
            assert torch.equal(result[key], support[key]), key


# Training through the engine -------------------------------------------------------------------

_COMMON = [
    "components.plugin=nnclr",
    *NARROW,
    "train.batch_size=64",
    "train.log_every=1",
    'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
    "knn.baseline=false",
    "health.baseline=false",
    "knn.every=0",
    "health.every=0",
    "data.workers=0",
]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _listening(registry: PluginRegistry) -> list[dict[str, float]]:
    seen: list[dict[str, float]] = []

    @sslplug.hookimpl
    def sslplug_step_end(metrics: dict[str, float]) -> None:
        seen.append(dict(metrics))

    plugin = types.ModuleType("nnclr_listener")
    plugin.sslplug_step_end = sslplug_step_end  # type: ignore[attr-defined]
    registry.register(plugin, "nnclr_listener")
    return seen


@pytest.mark.slow  # 30 steps on the default data
def test_trains_on_the_default_data_and_the_loss_falls(registry, tmp_path):
    metrics = _listening(registry)
    config = load_config(
        assignments=[
            *_COMMON,
            "train.epochs=1",
            "train.max_steps_per_epoch=30",
            f"train.out={tmp_path / 'run'}",
        ],
        plugin_settings=registry.settings_classes(),
    )
    with _one_thread():
        summary = train(config, registry)
    assert set(summary["components"].values()) == {"nnclr", "none"}
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    support = load_checkpoint(tmp_path / "run")["loss"]
    assert int(support["support_set.filled"]) == min(30 * 64, 4096)


def _resume_config(registry: PluginRegistry, out: Path):
    return load_config(
        assignments=[
            *_COMMON,
            "train.epochs=3",
            "train.max_steps_per_epoch=3",
            "nnclr.support_set_size=320",  # five batches: it wraps around within nine steps
            f"train.out={out}",
        ],
        plugin_settings=registry.settings_classes(),
    )


@pytest.mark.slow  # two runs of nine steps and one of three
def test_resume_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    registry = PluginRegistry()
    registry.load_entry_points()
    with _one_thread():
        train(_resume_config(registry, straight), registry)

    resumed = tmp_path / "resumed"
    registry = PluginRegistry()
    registry.load_entry_points()
    registry.register(StopAfterEpoch(2), "stop_after_epoch")
    with _one_thread(), pytest.raises(KeyboardInterrupt):
        train(_resume_config(registry, resumed), registry)
    assert load_checkpoint(resumed)["epoch"] == 2
    registry = PluginRegistry()
    registry.load_entry_points()
    with _one_thread():
        train(_resume_config(registry, resumed), registry, resume=resumed)

    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 9
    assert int(a["loss"]["support_set.filled"]) == 320
    assert int(a["loss"]["support_set.pointer"]) == 9 * 64 % 320
    for component in ("views", "encoder", "loss", "target_update"):
        assert (a[component] or {}).keys() == (b[component] or {}).keys(), component
        for key, value in (a[component] or {}).items():
            assert torch.equal(b[component][key], value), f"{component}.{key}"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("temperature", "0"),
        ("temperature", "-0.1"),
        ("support_set_size", "0"),
        ("projection_dim", "-8"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(registry, setting, value):
    with pytest.raises(ConfigError) as info:
        load_config(
            assignments=[f"nnclr.{setting}={value}"], plugin_settings=registry.settings_classes()
        )
    assert setting in str(info.value) and value in str(info.value)


# Mixes -----------------------------------------------------------------------------------------


def _build(registry: PluginRegistry, *assignments: str):
    config = load_config(assignments=list(assignments), plugin_settings=registry.settings_classes())
    backbone, dim = build_backbone("small", 32)
    return registry.build(config, RunContext(config=config, image_size=32), backbone, dim)


def test_nnclr_loss_brings_its_own_predictor_after_an_encoder_without_one(registry):
    parts = _build(registry, "components.plugin=simclr", "components.loss=nnclr", *NARROW)
    assert parts.loss.predictor is not None
    assert parts.loss.predictor[0].in_features == parts.encoder.projection_dim == 128
    assert parts.loss.support_set.embeddings.shape == (4096, 128)


@pytest.mark.slow  # 20 steps on the default data
def test_nnclr_loss_trains_on_byols_augmentation(registry, tmp_path):
    metrics = _listening(registry)
    config = load_config(
        assignments=[
            *_COMMON,
            "components.augmentation=byol",
            "train.epochs=1",
            "train.max_steps_per_epoch=20",
            f"train.out={tmp_path / 'run'}",
        ],
        plugin_settings=registry.settings_classes(),
    )
    with _one_thread():
        summary = train(config, registry)
    assert summary["components"]["augmentation"] == "byol"
    assert summary["components"]["loss"] == "nnclr"
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    ("assignment", "missing"),
    [("components.views=rotnet", "two_views"), ("components.encoder=rotnet", "projection")],
    ids=["rotnet-views", "rotnet-encoder"],
)
def test_a_mix_that_cannot_work_is_refused_naming_both_plugins(registry, assignment, missing):
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "components.plugin=nnclr", assignment, *NARROW)
    message = str(info.value)
    assert "'nnclr'" in message and "'rotnet'" in message and missing in message
