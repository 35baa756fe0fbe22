"""VICReg: the loss against the official main_vicreg.py's weighting and eq. 1-6 written out,
the whole batch's statistics under two gloo ranks (the built-in and the example of docs/examples),
a short run, settings and mixes."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sslplug_methods import vicreg

import sslplug
from sslplug import Outputs, Views
from sslplug.config import RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.nn import SmallConvNet, build_backbone

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "sslplug-vicreg-loss"
WORLD = 2
ROWS, DIM = 8, 6  # per rank


def _load_example() -> types.ModuleType:
    """The example plugin of docs/examples, imported from its file under a name of its own."""
    name = "sslplug_vicreg_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / "sslplug_vicreg_loss.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


example = _load_example()


def reference_terms(z1, z2, gamma=1.0, eps=1e-4):
    """Bardes et al. 2022: s (eq. 5), v(Z) + v(Z') (eq. 1), c(Z) + c(Z') (eq. 3-4), in plain
    Python."""
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])
    s = sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (n * d)

    def column(rows, j):
        return [r[j] for r in rows]

    def cov(rows, i, j):
        ci, cj = column(rows, i), column(rows, j)
        mi, mj = sum(ci) / n, sum(cj) / n
        return sum((x - mi) * (y - mj) for x, y in zip(ci, cj)) / (n - 1)

    def v(rows):
        return sum(max(0.0, gamma - math.sqrt(cov(rows, j, j) + eps)) for j in range(d)) / d

    def c(rows):
        return sum(cov(rows, i, j) ** 2 for i in range(d) for j in range(d) if i != j) / d

    return s, v(a) + v(b), c(a) + c(b)


def _views(n):
    return Views(images=(torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))


# The share of v(Z) + v(Z') that mu multiplies: main_vicreg.py's std_loss halves each view's
# hinge (the default), eq. 6 of the paper sums them
VARIANCE_SHARE = {"official": 0.5, "paper": 1.0}


@pytest.mark.parametrize("variance_term", ["official", "paper"])
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)])
def test_loss_matches_the_reference(weights, variance_term):
    g = torch.Generator().manual_seed(1)
    z1, z2 = 0.3 * torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    lam, mu, nu = weights
    settings = vicreg.VICRegSettings(
        invariance_weight=lam,
        variance_weight=mu,
        covariance_weight=nu,
        variance_term=variance_term,
    )
    loss, metrics = vicreg.VICRegLoss(settings)(Outputs(projections=(z1, z2)), _views(12), None)
    s, v, c = reference_terms(z1, z2)
    v = VARIANCE_SHARE[variance_term] * v
    assert metrics["invariance"].item() == pytest.approx(s, rel=1e-5)
    assert metrics["variance"].item() == pytest.approx(v, rel=1e-5)
    assert metrics["covariance"].item() == pytest.approx(c, rel=1e-5)
    assert loss.item() == pytest.approx(lam * s + mu * v + nu * c, rel=1e-5)
    assert v > 0  # z1's spread of 0.3 is under gamma = 1: the hinge is active


def test_the_default_is_the_official_weighting_and_paper_doubles_the_variance_term():
    assert vicreg.VICRegSettings().variance_term == "official"
    g = torch.Generator().manual_seed(2)
    z1, z2 = 0.2 * torch.randn(16, 4, generator=g), 0.5 * torch.randn(16, 4, generator=g)
    outputs = Outputs(projections=(z1, z2))
    official = vicreg.VICRegLoss(vicreg.VICRegSettings())(outputs, _views(16), None)
    paper = vicreg.VICRegLoss(vicreg.VICRegSettings(variance_term="paper"))(
        outputs, _views(16), None
    )
    s, v, c = reference_terms(z1, z2)
    assert official.loss.item() == pytest.approx(25 * s + 25 * v / 2 + c, rel=1e-5)
    assert paper.loss.item() - official.loss.item() == pytest.approx(25 * v / 2, rel=1e-4)


def test_spread_decorrelated_identical_views_cost_nothing_and_collapse_costs_mu():
    # columns of +-2: variance above gamma, orthogonal, and the two views equal
    z = 2 * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    loss, _ = vicreg.VICRegLoss(vicreg.VICRegSettings())(
        Outputs(projections=(z, z.clone())), _views(4), None
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # a constant embedding: each view's hinge is gamma - sqrt(eps) in every dimension, and the
    # official weighting takes the mean of the two views' hinges
    constant = torch.ones(4, 2)
    loss, _ = vicreg.VICRegLoss(vicreg.VICRegSettings())(
        Outputs(projections=(constant, constant.clone())), _views(4), None
    )
    assert loss.item() == pytest.approx(25.0 * (1 - math.sqrt(1e-4)), rel=1e-6)


def test_expander_is_three_layers_four_times_the_feature_width():
    backbone = SmallConvNet(width=4)
    encoder = vicreg.VICRegEncoder(backbone, backbone.out_dim, vicreg.VICRegSettings())
    linears = [m for m in encoder.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [4 * backbone.out_dim] * 3
    assert encoder.projection_dim == 4 * backbone.out_dim
    out = encoder(Views(images=(torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16))))
    assert [z.shape for z in out.projections] == [(5, 128), (5, 128)]


# two gloo ranks against one process -----------------------------------------------------------


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, DIM, generator=g), 0.5 * torch.randn(
        WORLD * ROWS, DIM, generator=g
    )


def _loss(
    which: str,
    z1: torch.Tensor,
    z2: torch.Tensor,
    variance_term: Literal["official", "paper"] = "official",
) -> torch.Tensor:
    if which == "builtin":
        return vicreg.VICRegLoss(vicreg.VICRegSettings(variance_term=variance_term))(
            Outputs(projections=(z1, z2)), _views(z1.shape[0]), None
        ).loss
    return example.VICRegLoss(example.VICRegSettings())(
        Outputs(projections=(z1, z2)), _views(z1.shape[0]), None
    ).loss


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for which in ("builtin", "example"):
            z1, z2 = (
                z[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_() for z in _embeddings()
            )
            loss = _loss(which, z1, z2)
            loss.backward()
            results[which] = {"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The loss and gradients of the built-in and of the example on each of two gloo ranks."""
    out = tmp_path_factory.mktemp("ranks")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.slow  # two gloo ranks in spawned processes
@pytest.mark.parametrize("which", ["builtin", "example"])
def test_two_ranks_match_one_process_with_the_whole_batch(which, two_ranks):
    z1, z2 = (z.clone().requires_grad_() for z in _embeddings())
    loss = _loss(which, z1, z2)
    loss.backward()
    ranks = [r[which] for r in two_ranks]
    g1, g2 = z1.grad, z2.grad
    assert g1 is not None and g2 is not None

    # every rank computes the loss of the whole batch
    losses = torch.stack([r["loss"] for r in ranks])
    torch.testing.assert_close(losses, loss.detach().expand(WORLD), rtol=1e-5, atol=1e-6)
    for r, result in enumerate(ranks):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        torch.testing.assert_close(result["g1"] / WORLD, g1[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["g2"] / WORLD, g2[rows], rtol=1e-4, atol=1e-6)


def test_the_example_computes_the_builtin_loss_with_the_papers_weighting():
    # the example (a released package, 0.1.0) writes eq. 6 as the paper does
    z1, z2 = _embeddings()
    torch.testing.assert_close(_loss("example", z1, z2), _loss("builtin", z1, z2, "paper"))


# through the engine ---------------------------------------------------------------------------


def _listening(registry) -> list[dict[str, float]]:
    """The metrics of every step of the next run with ``registry``."""
    seen: list[dict[str, float]] = []

    @sslplug.hookimpl
    def sslplug_step_end(metrics: dict[str, float]) -> None:
        seen.append(dict(metrics))

    plugin = types.ModuleType("metrics_listener")
    plugin.sslplug_step_end = sslplug_step_end  # type: ignore[attr-defined]
    registry.register(plugin, "metrics_listener")
    return seen


def _run(registry, tmp_path: Path, *assignments: str, steps: int = 12) -> dict:
    config = load_config(
        assignments=[
            *assignments,
            "train.epochs=1",
            f"train.max_steps_per_epoch={steps}",
            "train.batch_size=64",
            "train.log_every=1",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "knn.every=0",
            "health.every=0",
            "optim.warmup_epochs=0",
            "data.workers=0",
            f"train.out={tmp_path / 'run'}",
        ],
        plugin_settings=registry.settings_classes(),
    )
    return train(config, registry)


@pytest.mark.slow  # 12 steps on the default data
def test_short_run_on_the_default_data_lowers_the_loss(registry, tmp_path):
    metrics = _listening(registry)
    summary = _run(registry, tmp_path, "components.plugin=vicreg")
    assert set(summary["components"].values()) == {"vicreg", "none"}
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    assert {"invariance", "variance", "covariance"} <= set(metrics[-1])


@pytest.mark.slow  # 6 steps on the default data
@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (["components.plugin=simclr", "components.loss=vicreg"], {"encoder": "simclr"}),
        (["components.plugin=vicreg", "components.augmentation=byol"], {"augmentation": "byol"}),
    ],
    ids=["simclr-encoder", "byol-augmentation"],
)
def test_vicreg_mixes(registry, tmp_path, choice, expected):
    metrics = _listening(registry)
    summary = _run(registry, tmp_path, *choice, steps=6)
    assert {k: summary["components"][k] for k in expected} == expected
    assert all(math.isfinite(m["loss"]) for m in metrics) and len(metrics) == 6


def test_a_loss_without_two_views_is_refused_naming_both(registry):
    config = load_config(
        assignments=["components.plugin=rotnet", "components.loss=vicreg"],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 32)
    with pytest.raises(ComponentMismatchError) as info:
        registry.build(config, RunContext(config=config, image_size=32), backbone, dim)
    message = str(info.value)
    assert "'vicreg'" in message and "'rotnet'" in message


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("invariance_weight", "-1.0"),
        ("variance_weight", "-0.5"),
        ("covariance_weight", "-2.0"),
        ("gamma", "0.0"),
        ("eps", "-0.0001"),
        ("expander_dim", "-8"),
        ("variance_term", "'eq6'"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(registry, setting, value):
    with pytest.raises(ConfigError, match=rf"{setting} must be .*got {value}"):
        load_config(
            assignments=["components.plugin=vicreg", f"vicreg.{setting}={value}"],
            plugin_settings=registry.settings_classes(),
        )
