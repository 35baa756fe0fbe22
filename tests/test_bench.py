"""``sslplug bench`` measures both paths and writes what it measured (speed is asserted in
benchmarks/, never here)."""

from __future__ import annotations

import json

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
