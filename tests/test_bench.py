"""``sslplug bench`` measures both paths and writes what it measured (speed is asserted in
benchmarks/, never here); ``benchmarks/gpu_report.py`` reads what it and a run wrote."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from sslplug.bench import per_image_recipe
from sslplug.cli import main


def test_bench_measures_both_paths_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--batch-size", "16", "--steps", "1", "--repeats", "2", "--warmup", "1"]
    args += ["--workers", "0", "--set", "byol.projector_hidden_dim=64", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ratio sslplug / baseline, views" in text
    results = json.loads(out.read_text())
    for key in ("sslplug_views", "sslplug_step", "baseline_views", "baseline_step"):
        assert results[key]["images_per_second"] > 0
        assert len(results[key]["images_per_second_all"]) == 2
        assert 0 <= results[key]["data_wait_share"] <= 1
    assert results["ratio_step"] > 0


def test_bench_of_a_pretext_method_has_no_baseline(capsys):
    args = ["bench", "--plugin", "rotnet", "--batch-size", "8", "--steps", "1", "--repeats", "1"]
    assert main([*args, "--warmup", "0"]) == 0
    assert "no per-image baseline" in capsys.readouterr().out


def test_per_image_recipe_follows_the_settings(registry):
    from sslplug.config import load_config

    config = load_config(None, ["byol.solarize_prob=[0.0, 0.5]"], registry.settings_classes())
    first, second = per_image_recipe(config.plugins["byol"], 32)
    names = [type(t).__name__ for t in second.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    solarize = next(t for t in second.transforms if isinstance(t, T.RandomSolarize))
    assert solarize.p == 0.5
    assert not any(isinstance(t, T.RandomSolarize) for t in first.transforms)
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    assert first(image).shape == (3, 32, 32)


def test_bad_bench_input_is_a_message(capsys):
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size 0 must be positive" in capsys.readouterr().err

@pytest.mark.slow  # a ViT in bf16 on the CPU
def test_bench_runs_a_vit_in_bf16(tmp_path, capsys):
    out = tmp_path / "vit.json"
    args = ["bench", "--plugin", "dino", "--backbone", "vit_micro", "--batch-size", "8"]
    args += ["--steps", "1", "--repeats", "1", "--warmup", "0", "--no-baseline"]
    args += ["--precision", "bf16", "--set", "dino.out_dim=64", "--out", str(out)]
    assert main(args) == 0
    assert "dino, vit_micro backbone" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["sslplug_step"]["images_per_second"] > 0
    assert results["settings"]["precision"] == "bf16"


def _gpu_report():
    """``benchmarks/gpu_report.py``, which is a script, not a module of the package."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_report.py"
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _summary(curve: list[tuple[int, float, float]]) -> dict:
    """A run's summary.json with the kNN ``curve`` as (epoch, top-1, train seconds)."""
    return {
        "epochs": curve[-1][0],
        "epochs_planned": 500,
        "stopped_by_time_limit": True,
        "precision": "bf16",
        "compile": True,
        "knn_top1_random_init": 30.0,
        "knn_history": [
            {"epoch": e, "top1": top1, "train_seconds": s, "wall_seconds": s + e}
            for e, top1, s in curve
        ],
        "data_wait_share_median": 0.01,
        "images_per_second_median": 9000.0,
    }


def test_gpu_report_extrapolates_from_the_epochs_after_the_first():
    report = _gpu_report()
    # epochs of 60 s (compiling), then 5, 7 and 6 s: 6 s steady
    run = report.fixed_time(
        _summary([(1, 40, 60), (2, 50, 65), (3, 55, 72), (4, 58, 78)]),
        images=50_000,
        target_epochs=500,
        epoch_images=50_000,
        baseline_minutes=99,
    )
    assert run["seconds_per_epoch_first"] == 60
    assert run["seconds_per_epoch_steady"] == 6
    assert run["steady_images_per_second"] == pytest.approx(50_000 / 6)
    assert run["minutes_to_90_extrapolated"] == pytest.approx(500 * 6 / 60)
    assert "minutes_to_90_measured" not in run
    # a run on a tenth of the data, or of capped epochs, extrapolates to whole epochs
    small = report.fixed_time(
        _summary([(1, 40, 60), (2, 50, 65), (3, 55, 72), (4, 58, 78)]),
        images=5_000,
        target_epochs=500,
        epoch_images=50_000,
        baseline_minutes=99,
    )
    assert small["minutes_to_90_extrapolated"] == pytest.approx(10 * 500 * 6 / 60)


def test_gpu_report_says_when_the_run_reached_90_percent():
    report = _gpu_report()
    run = report.fixed_time(
        _summary([(1, 85, 10), (2, 90.5, 20), (3, 91, 30)]),
        images=50_000,
        target_epochs=500,
        epoch_images=50_000,
        baseline_minutes=99,
    )
    assert run["minutes_to_90_measured"] == pytest.approx(20 / 60)
    assert "minutes_to_90_extrapolated" not in run


def test_gpu_report_reads_what_bench_and_run_wrote(fast_args, tmp_path, capsys):
    out = tmp_path / "gpu"
    args = ["bench", "--batch-size", "16", "--steps", "1", "--repeats", "1", "--warmup", "0"]
    args += ["--workers", "0", "--no-baseline", "--set", "byol.projector_hidden_dim=64"]
    assert main([*args, "--out", str(out / "bench" / "byol.json")]) == 0
    assert main(fast_args) == 0
    (out / "run").mkdir()
    for name in ("summary.json", "settings.toml"):
        (out / "run" / name).write_bytes((tmp_path / "run" / name).read_bytes())
    capsys.readouterr()
    assert _gpu_report().main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "byol" in text and "epochs done: 2 of 2 (all epochs done)" in text
    written = json.loads((out / "report.json").read_text())
    [row] = written["speed"]
    assert row["plugin"] == "byol" and row["compile"] is False and row["step_images_per_second"] > 0
    run = written["fixed_time_run"]
    assert [point["epoch"] for point in run["knn_curve"]] == [1, 2]
    # 2 steps of 32 images an epoch, over the seconds of the second epoch
    seconds = run["knn_curve"][1]["train_seconds"] - run["knn_curve"][0]["train_seconds"]
    assert run["steady_images_per_second"] == pytest.approx(64 / seconds)
