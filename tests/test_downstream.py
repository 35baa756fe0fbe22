"""After pre-training: ``sslplug eval``, ``finetune`` and ``export`` on a real (short) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from sslplug.cli import main
from sslplug.config import DataSettings
from sslplug.data import load_data
from sslplug.finetune import FinetuneSettings, finetune
from sslplug.nn import SmallConvNet
from sslplug.pretrained import build_encoder, load_run

from .conftest import FAST
from .harness import run_one_epoch


def _train(shapes_folder: Path, out: Path, *extra: str) -> Path:
    return run_one_epoch(shapes_folder, out, FAST, *extra)


@pytest.fixture(scope="module")
def byol_run(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(shapes_folder, tmp_path_factory.mktemp("byol") / "run")


def test_a_run_writes_test_embeddings_for_the_projector(byol_run):
    config = (byol_run / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "test_features" in config
    metadata = next((byol_run / "tensorboard").rglob("metadata.tsv")).read_text().split()
    assert len(metadata) == 20 and "disk" in metadata


def test_eval_reports_knn_and_linear_probe_and_records_them(byol_run, capsys):
    assert main(["eval", str(byol_run), "--labels", "2", "--labels", "all", "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "linear top-1" in out and "random init" in out
    summary = json.loads((byol_run / "summary.json").read_text())
    recorded = summary["evaluations"][-6:]
    rows = [r for r in recorded if r["kind"] == "frozen"]
    health = [r for r in recorded if r["kind"] == "health"]
    assert [r["init"] for r in health] == ["pre-trained", "random init"]
    assert "label-free health" in out and health[0]["rank_features"] >= 1
    assert [(r["labels"], r["init"]) for r in rows] == [
        ("2/class", "pre-trained"),
        ("all", "pre-trained"),
        ("2/class", "random init"),
        ("all", "random init"),
    ]
    assert rows[0]["labelled_images"] == 20 and rows[1]["labelled_images"] == 80
    for row in rows:
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
    # The run's own kNN figures are reproduced: the trained weights, and the exact random init.
    assert rows[1]["knn_top1"] == pytest.approx(summary["knn_top1"], abs=1e-4)
    assert rows[3]["knn_top1"] == pytest.approx(summary["knn_top1_random_init"], abs=1e-4)


def test_finetune_with_baseline_reports_both_initialisations(byol_run, capsys):
    args = ["finetune", str(byol_run), "--labels", "4", "--steps", "3", "--baseline"]
    assert main(args) == 0
    assert "fine-tuned top-1" in capsys.readouterr().out
    rows = json.loads((byol_run / "summary.json").read_text())["evaluations"][-2:]
    assert [r["init"] for r in rows] == ["pre-trained", "random init"]
    assert all(r["kind"] == "finetune" and r["labelled_images"] == 40 for r in rows)


def test_finetuning_learns_and_leaves_the_encoder_unchanged(byol_run, registry):
    run = load_run(byol_run, registry)
    data = load_data(DataSettings(name="shapes"))
    encoder = build_encoder(run, registry, 32, 10, torch.device("cpu"), pretrained=False)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    index = torch.cat([(data.train.labels == c).nonzero()[:40, 0] for c in range(10)])
    settings = FinetuneSettings(steps=40, batch_size=64, backbone_lr_scale=1.0)  # from scratch
    top1 = finetune(encoder, data, index, torch.device("cpu"), settings)
    assert top1 > 35.0  # chance is 10%
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_finetuning_starts_from_the_linear_probe_of_the_frozen_features(byol_run, registry):
    from sslplug.augment import normalize, to_float
    from sslplug.evaluate import fit_probe
    from sslplug.finetune import _Classifier, _probe_head

    run = load_run(byol_run, registry)
    data = load_data(DataSettings(name="shapes"))
    encoder = build_encoder(run, registry, 32, 10, torch.device("cpu"))
    index = torch.cat([(data.train.labels == c).nonzero()[:20, 0] for c in range(10)])
    images, labels = data.train.images[index], data.train.labels[index]
    model = _Classifier(encoder, 10)
    _probe_head(model, images, labels, 10, seed=0)
    with torch.no_grad():
        features = encoder.eval().features(normalize(to_float(images)))
        probe = fit_probe(features, labels, 10, seed=0)
        torch.testing.assert_close(model(normalize(to_float(images))), probe(features))
    assert (probe(features).argmax(1) == labels).float().mean() > 0.5


def test_the_scratch_baseline_fine_tunes_the_encoder_at_the_head_rate(byol_run, capsys):
    args = ["finetune", str(byol_run), "--labels", "4", "--steps", "2", "--baseline"]
    assert main(args) == 0
    rows = json.loads((byol_run / "summary.json").read_text())["evaluations"][-2:]
    assert [r["backbone_lr_scale"] for r in rows] == [0.1, 1.0]
    assert [r["probe_first"] for r in rows] == [True, False]
    assert main([*args, "--backbone-lr-scale", "0"]) == 2
    assert "--backbone-lr-scale 0.0 must be in (0, 1]" in capsys.readouterr().err


def test_export_small_backbone_loads_strictly_and_gives_the_same_features(
    byol_run, tmp_path, registry
):
    out = tmp_path / "backbone.pt"
    assert main(["export", str(byol_run), str(out)]) == 0
    note = json.loads(out.with_suffix(".json").read_text())
    assert note["backbone"] == "small" and note["feature_dim"] == 128
    net = SmallConvNet()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    encoder = build_encoder(load_run(byol_run, registry), registry, 32, 10, torch.device("cpu"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(net.eval()(x), encoder.features(x), atol=1e-6)


@pytest.mark.slow  # a run with a ResNet-18
def test_export_resnet18_loads_into_torchvision_with_strict(shapes_folder, tmp_path, registry):
    run = _train(
        shapes_folder,
        tmp_path / "r18",
        "--backbone",
        "resnet18",
        "--set",
        "train.max_steps_per_epoch=1",
        "--set",
        "knn.baseline=false",
        "--set",
        "health.baseline=false",
        "--set",
        "tensorboard.embedding_samples=0",
    )
    out = tmp_path / "r18.pt"
    assert main(["export", str(run), str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["cifar_stem"] is True
    # The three lines of docs/evaluation.md.
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool, net.fc = (
        nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        nn.Identity(),
        nn.Identity(),
    )
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    encoder = build_encoder(load_run(run, registry), registry, 32, 10, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net.eval()(x), encoder.features(x), atol=1e-5)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"not a checkpoint at all", "not a readable sslplug checkpoint"),
        ("foreign", "not an sslplug checkpoint"),
        (None, "no checkpoint at"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "finetune", "export"])
def test_foreign_or_corrupt_checkpoint_is_a_clear_error(
    tmp_path, command, content, pattern, capsys
):
    path = tmp_path / "last.pt"
    if content == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    args = [command, str(path)] + ([str(tmp_path / "out.pt")] if command == "export" else [])
    assert main(args) == 2
    assert pattern in capsys.readouterr().err


def test_bad_label_budget_on_the_command_line(byol_run, capsys):
    assert main(["eval", str(byol_run), "--labels", "0%"]) == 2
    assert "labels '0%' is not a label budget" in capsys.readouterr().err


def test_eval_on_unlabelled_data_says_labels_are_needed_and_shows_the_label_free_measures(
    byol_run, tmp_path, capsys
):
    flat = tmp_path / "flat"
    flat.mkdir()
    from sslplug.data import make_shapes

    from .conftest import write_images

    images, labels = make_shapes(per_class=1, seed=0)
    write_images(images, labels, flat, classes=False)
    assert main(["eval", str(byol_run), "--data", str(flat)]) == 0
    out = capsys.readouterr().out
    assert "has no labelled train and test splits: no kNN accuracy or linear probe" in out
    assert "label-free health" in out and "rank_features" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "nan"], "--lr nan must be a positive, finite number"),
        (["--backbone-lr-scale", "nan"], "--backbone-lr-scale nan must be in (0, 1]"),
        (["--label-seed", "-1"], "--label-seed -1 must be a whole number from 0 to 4294967295"),
    ],
)
def test_finetune_refuses_bad_numbers_before_reading_the_run(tmp_path, capsys, args, message):
    assert main(["finetune", str(tmp_path / "no-run"), *args]) == 2
    assert message in capsys.readouterr().err
