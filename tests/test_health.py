"""Label-free health measures, the collapse warning and train.stop_on_collapse."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from sslplug.health import (
    COLLAPSE_SPREAD,
    alignment,
    collapse,
    effective_rank,
    spread,
    uniformity,
)


def test_effective_rank_follows_rankme_on_known_spectra():
    # singular values 1, 1, 1, 0, ...: entropy log 3, rank 3
    basis = torch.eye(8)[:3]
    z = torch.cat([basis, -basis])  # rows on three orthogonal axes
    assert effective_rank(z) == pytest.approx(3.0, rel=1e-4)
    line = torch.randn(100, 1) * torch.randn(1, 16)  # every row on one line
    assert effective_rank(line) == pytest.approx(1.0, rel=1e-3)
    # the formula written out on a random matrix
    x = torch.randn(50, 10, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    p = s / s.sum() + 1e-7
    assert effective_rank(x) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)


def test_spread_is_zero_for_one_direction_and_near_one_on_the_sphere():
    same = torch.randn(1, 32).expand(500, 32) * torch.rand(500, 1)  # one direction, any length
    assert spread(same) == pytest.approx(0.0, abs=1e-6)
    sphere = torch.randn(20_000, 32)
    assert spread(sphere) == pytest.approx(1.0, abs=0.02)
    x = torch.randn(64, 8, dtype=torch.float64)
    reference = F.normalize(x, dim=1).std(dim=0).mean().item() * math.sqrt(8)
    assert spread(x) == pytest.approx(reference, rel=1e-12)


def test_alignment_and_uniformity_match_wang_and_isola():
    a, b = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    na, nb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    assert alignment(a, b) == pytest.approx(((na - nb).norm(dim=1) ** 2).mean().item())
    assert alignment(a, 3 * a) == pytest.approx(0.0, abs=1e-12)
    pairs = [
        math.exp(-2 * ((na[i] - na[j]).norm() ** 2).item())
        for i in range(40)
        for j in range(i + 1, 40)
    ]
    assert uniformity(a) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-9)
    assert uniformity(torch.ones(10, 4)) == pytest.approx(0.0, abs=1e-9)  # all in one point


def test_the_collapse_rule_needs_two_low_epochs_in_a_row_that_do_not_recover():
    low = COLLAPSE_SPREAD / 2
    assert collapse({"spread_features": low}, None) is None  # one epoch is not enough
    assert collapse({"spread_features": 0.5, "spread_projections": 0.4}, {}) is None
    assert collapse({"spread_features": low}, {"spread_features": low}) == (
        "spread_features",
        low,
    )
    assert collapse(
        {"spread_features": 0.5, "spread_projections": 0.012},
        {"spread_features": 0.4, "spread_projections": 0.014},
    ) == ("spread_projections", 0.012)
    # spreading out from a start where a random projector's outputs pointed alike
    assert collapse({"spread_projections": 0.035}, {"spread_projections": 0.024}) is None
    assert collapse({"spread_projections": 0.02}, {"spread_projections": 0.3}) is None


def test_the_collapse_warning_names_the_causes_the_method_s_loss_gives():
    from sslplug_methods import byol, simclr

    from sslplug.monitors.health import collapse_warning

    hint = byol.BYOLLoss.collapse_hint
    assert hint == (
        "BYOL needs its predictor and its EMA target: check the target update (not 'none', "
        "byol.tau not far below 0.99), that the predictor is used, and the learning rate"
    )
    warned = collapse_warning("spread_projections", 0.01, 4, hint)
    assert f"Likely causes: {hint}. Set train.stop_on_collapse=true" in warned
    # a loss that names none: the causes common to every method
    assert simclr.NTXentLoss.collapse_hint == ""
    assert "Likely causes: a learning rate too high, a missing predictor" in collapse_warning(
        "spread_features", 0.01, 4, ""
    )


SMALL = [
    "--disable", "progress", "--set", "train.batch_size=128",
    "--set", "train.max_steps_per_epoch=15",
    "--set", "knn.every=1", "--set", "health.every=1", "--set", "health.samples=256",
    "--set", "knn.k=20", "--set", "tensorboard.embedding_samples=0", "--set", "data.workers=0",
    "--set", "byol.projector_hidden_dim=256", "--set", "byol.predictor_hidden_dim=256",
]
COLLAPSING = ["--plugin", "byol", "--target-update", "none", "--set", "byol.predictor=false"]


def _epoch_line(stderr: str, epoch: int) -> str:
    """The epoch line without its speeds, which differ from one session to the next."""
    line = next(x for x in stderr.splitlines() if x.startswith(f"epoch {epoch}/"))
    return re.sub(r"[\d.]+ img/s, data wait [\d.]+%", "", line)


def _warning(stderr: str, epoch: int) -> str:
    """The collapse warning after ``epoch``: what was measured, without the advice, which
    depends on whether the run stops for it."""
    line = next(x for x in stderr.splitlines() if f"collapsed after epoch {epoch}:" in x)
    return line.partition(" Likely causes:")[0]


@pytest.mark.slow
def test_a_run_made_to_collapse_is_warned_and_stop_on_collapse_keeps_the_last_good_epoch(
    run_cli, tmp_path
):
    """A collapsing run stops and keeps the last good epoch; it resumes only with
    --ignore-collapse, and then the rule goes on as in an uninterrupted run."""
    out = tmp_path / "run"
    done = run_cli([
        "run", *COLLAPSING, "--epochs", "6", "--out", out, *SMALL,
        "--set", "train.stop_on_collapse=true",
        # the health monitor alone watches for collapse: no kNN but the last epoch's
        "--set", "knn.every=0", "--set", "knn.baseline=false",
    ])
    assert done.returncode == 0, done.stderr
    assert "warning: the embeddings have collapsed after epoch" in done.stderr
    assert "spread_projections is 0.0" in done.stderr
    assert "Likely causes: BYOL needs its predictor and its EMA target" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["epochs"]
    assert stopped_at < 6 and "collapsed" in summary["stopped"]
    assert f"stopped after epoch {stopped_at}" in done.stderr
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == stopped_at - 1  # the collapsed epoch was not saved
    assert f"to continue anyway: sslplug run --resume {out} --ignore-collapse" in done.stderr
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "summary.json")}

    refused = run_cli(["run", "--resume", out])  # it would train into the same collapse
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(
        f"sslplug: error: --resume {str(out)!r}: the run stopped after epoch {stopped_at} "
        f"because its embeddings collapsed (spread_projections 0.0"
    ), refused.stderr
    assert f"from its checkpoint of epoch {stopped_at - 1} would train" in refused.stderr
    assert "lower learning rate" in refused.stderr and "--ignore-collapse" in refused.stderr
    assert f"epoch {stopped_at}/" not in refused.stderr  # refused before any training
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert run_cli(["run", "--ignore-collapse"]).returncode == 2  # a new run has none to ignore

    resumed = run_cli(["run", "--resume", out, "--ignore-collapse"])  # to the planned 6 epochs
    assert resumed.returncode == 0, resumed.stderr
    assert f"--ignore-collapse: {out} stopped after epoch {stopped_at} because" in resumed.stderr
    # the monitor kept the epoch before: the same warning after the same epoch, bit for bit
    assert _warning(resumed.stderr, stopped_at) == _warning(done.stderr, stopped_at)
    assert "the run stops now" in done.stderr and "the run stops now" not in resumed.stderr
    assert _epoch_line(resumed.stderr, stopped_at) == _epoch_line(done.stderr, stopped_at)
    assert "train.stop_on_collapse is set" not in resumed.stderr  # no stop this time
    summary = json.loads((out / "summary.json").read_text())  # warned, and never stopped
    assert summary["epochs"] == 6 and summary["stopped"] is None
    assert summary["collapsed_epochs"] == list(range(stopped_at, 7))
    assert summary["stopped_for_collapse"] is None
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 6
    assert "stop_on_collapse = false" in (out / "settings.toml").read_text()


@pytest.mark.slow
def test_the_default_byol_recipe_is_not_called_collapsed_and_shows_the_measures(
    run_cli, tmp_path
):
    out = tmp_path / "run"
    done = run_cli(["run", "--plugin", "byol", "--epochs", "3", "--out", out, *SMALL])
    assert done.returncode == 0, done.stderr
    assert "collapsed" not in done.stderr
    assert ", rank " in done.stderr and ", spread " in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    history = summary["health_history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    for h in history[1:]:
        assert h["spread_projections"] > 0.2 and h["rank_features"] > 5
        assert 0 < h["alignment"] < 2 and h["uniformity"] < 0

@pytest.mark.slow  # a run of many steps on a folder
def test_unlabelled_data_shows_the_label_free_measures_and_says_why_no_knn(
    run_cli, tmp_path
):
    from sslplug.data import make_shapes
    from tests.conftest import write_images

    images, labels = make_shapes(per_class=20, seed=0)
    write_images(images, labels, tmp_path / "flat", classes=False)
    out = tmp_path / "run"
    done = run_cli([
        "run", "--plugin", "simclr", "--data", tmp_path / "flat", "--epochs", "1",
        "--out", out, "--set", "train.batch_size=50", "--disable", "progress",
        "--set", "health.samples=100", "--set", "data.workers=0",
    ])
    assert done.returncode == 0, done.stderr
    assert "has no labels: no kNN accuracy can be computed" in done.stderr
    assert ", rank " in done.stderr and "kNN top-1" not in done.stderr
    evaluated = run_cli(["eval", out, "--baseline"])
    assert evaluated.returncode == 0, evaluated.stderr
    assert "no kNN accuracy or linear probe can be computed without labels" in evaluated.stdout
    lines = evaluated.stdout.split("label-free health")[1].splitlines()
    assert lines[1].split()[:4] == ["init", "images", "rank_features", "spread_features"]
    assert lines[2].startswith("pre-trained") and lines[3].startswith("random init")
    recorded = json.loads((out / "summary.json").read_text())["evaluations"]
    assert [r["kind"] for r in recorded] == ["health", "health"]
    assert recorded[0]["images"] == 100 and "alignment" in recorded[0]


BUILT_IN = (
    "byol", "simclr", "barlow_twins", "rotnet", "jigsaw", "cpc", "moco_v2", "moco_v3",
    "nnclr", "simsiam", "vicreg", "swav", "dino", "mae", "ijepa",
)  # fmt: skip


@pytest.mark.slow  # fifteen short runs, one per method
@pytest.mark.parametrize("method", BUILT_IN)
def test_no_built_in_method_is_called_collapsed_at_the_start_of_its_default_run(
    registry, tmp_path, method
):
    """The rule must not fire on a healthy run: each method's default recipe over its first
    32 steps, measured after every epoch and judged at the second (the rule waits for
    COLLAPSE_MIN_STEPS). docs/health.md has longer runs of every method, three seeds each."""
    from sslplug.config import load_config
    from sslplug.engine import train

    config = load_config(
        assignments=[
            f"components.plugin={method}",  # on the default data: 16 steps of 16 an epoch
            "data.workers=0",
            "train.epochs=2",
            "train.batch_size=16",
            "train.max_steps_per_epoch=16",  # 32 steps: the rule judges from step 30
            "health.every=1",
            "health.samples=128",
            f"train.out={tmp_path}",
            'train.disable=["progress", "knn", "view_grid", "tensorboard"]',
            *(["model.backbone=vit_micro"] if method in ("mae", "ijepa") else []),
        ],
        plugin_settings=registry.settings_classes(),
    )
    summary = train(config, registry)
    assert summary["steps"] == 32
    history = summary["health_history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert not any(h.get("collapsed") for h in history), history
    for h in history:
        assert h["rank_features"] >= 1 and 0 < h["spread_features"] <= 1.5
