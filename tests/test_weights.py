"""Starting from weights: ``model.pretrained`` (published weights, a file, an export, a run),
strict loading with the keys named, a ViT resampled to another grid, and the backbone's
learning rates of continued pre-training (``optim.backbone_lr_scale``, ``optim.layer_decay``)."""

from __future__ import annotations

import contextlib
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from sslplug.assembly import assemble
from sslplug.cli import main
from sslplug.errors import CheckpointError, ConfigError
from sslplug.nn import backbone_layers, build_backbone
from sslplug.weights import load_weights, pretrained_backbone

from .harness import StopAfterEpoch, assert_same_checkpoints, config_of, train_pinned
from .test_method_contract import SHORT

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _backbone(registry, assignments: list[str]) -> nn.Module:
    config = config_of(registry, assignments)
    built = assemble(config, registry, image_size=32, device=torch.device("cpu"), train=False)
    return built.parts.encoder.backbone.eval()


def _features(backbone: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(IMAGES)


def test_published_weights_offline_give_one_line_naming_the_model_and_the_cache(
    tmp_path, monkeypatch, capsys
):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        code = main(
            ["run", "--plugin", "simclr", "--epochs", "1", "--out", str(tmp_path / "run"),
             "--set", "model.backbone=resnet18", "--set", "model.pretrained=true"]
        )  # fmt: skip
    finally:
        torch.hub.set_dir(str(Path.home() / ".cache" / "torch" / "hub"))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "'resnet18 (ResNet18_Weights.IMAGENET1K_V1)'" in err
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err
    assert "model.pretrained=PATH" in err


def test_published_timm_weights_offline_name_the_model_and_the_hub_cache(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent/hub")
    with pytest.raises(ConfigError) as caught:
        build_backbone("timm:resnet18.a1_in1k", 32, published=True)
    message = str(caught.value)
    assert "timm:resnet18" in message and "models--timm--resnet18.a1_in1k" in message


def test_the_small_backbone_has_no_published_weights():
    with pytest.raises(ConfigError, match="no published weights"):
        build_backbone("small", 32, published=True)


@pytest.mark.parametrize("backbone", ["small", "resnet18", "vit_micro"])
def test_weights_of_a_run_an_export_and_a_state_dict_give_the_source_s_features(
    registry, tmp_path, backbone
):
    run = tmp_path / "run"
    train_pinned(run, [*SHORT, "components.plugin=simclr", f"model.backbone={backbone}"])
    trained = _backbone(registry, [f"model.backbone={backbone}", f"model.pretrained={run}"])
    fresh = _backbone(registry, [f"model.backbone={backbone}"])
    assert not torch.allclose(_features(trained), _features(fresh))

    exported = tmp_path / "backbone.pt"
    assert main(["export", str(run), str(exported)]) == 0
    from_export = _backbone(
        registry, [f"model.backbone={backbone}", f"model.pretrained={exported}"]
    )
    assert torch.equal(_features(from_export), _features(trained))

    # a training script's checkpoint: nested, prefixed, with a classifier beside the backbone
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 4)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "script.pth")
    from_script = _backbone(
        registry, [f"model.backbone={backbone}", f"model.pretrained={tmp_path / 'script.pth'}"]
    )
    assert torch.equal(_features(from_script), _features(trained))


def test_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    small, _ = build_backbone("small", 32)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    resnet, _ = build_backbone("resnet18", 32)
    with pytest.raises(CheckpointError) as caught:
        load_weights(resnet, tmp_path / "small.pt")
    message = str(caught.value)
    assert "missing keys: bn1.bias, " in message and "(120 in all)" in message
    assert "unexpected keys: features.0.weight, " in message and "(24 in all)" in message

    stem, _ = build_backbone("resnet18", 32, "off")  # the ImageNet stem: conv1 is 7x7
    torch.save(resnet.state_dict(), tmp_path / "cifar_stem.pt")
    with pytest.raises(CheckpointError, match=r"conv1.weight \(64, 3, 3, 3\)"):
        load_weights(stem, tmp_path / "cifar_stem.pt")


def test_a_missing_file_and_a_file_without_weights_are_named(tmp_path):
    small, _ = build_backbone("small", 32)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_weights(small, tmp_path / "nothing.pt")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(small, tmp_path / "no_weights.pt")


def test_a_vit_at_another_size_gets_its_position_embedding_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source, _ = build_backbone("vit_micro", 32, patch_size=4)
    torch.save(source.exported_state_dict(), tmp_path / "vit.pt")  # an 8x8 grid
    larger, _ = build_backbone("vit_micro", 64, patch_size=4)  # a 16x16 grid
    load_weights(larger, tmp_path / "vit.pt")
    vit = source.vit
    expected = resample_abs_pos_embed(
        vit.pos_embed, [16, 16], old_size=[8, 8], num_prefix_tokens=vit.num_prefix_tokens
    )
    assert torch.equal(larger.vit.pos_embed, expected)
    assert torch.equal(larger.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_a_teacher_from_a_run_is_its_backbone_at_its_size(registry, tmp_path):
    run = tmp_path / "run"
    train_pinned(run, [*SHORT, "components.plugin=simclr"])
    teacher = pretrained_backbone(str(run))
    trained = _backbone(registry, [f"model.pretrained={run}"])
    assert (teacher.image_size, teacher.feature_dim) == (32, trained(IMAGES).shape[1])
    # the run's encoder is placed channels-last, the teacher is not: the same up to rounding
    assert torch.allclose(_features(teacher.module), _features(trained), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="do not say their architecture"):
        torch.save(trained.state_dict(), tmp_path / "plain.pt")
        pretrained_backbone(str(tmp_path / "plain.pt"))
    named = pretrained_backbone(str(tmp_path / "plain.pt"), 32, backbone="small")
    assert torch.allclose(_features(named.module), _features(trained), rtol=1e-5, atol=1e-7)


def test_backbone_learning_rates_follow_the_scale_and_the_layer_decay(registry):
    config = config_of(
        registry,
        ["components.plugin=simclr", "optim.backbone_lr_scale=0.1", "optim.layer_decay=0.5"],
    )
    built = assemble(config, registry, image_size=32, device=torch.device("cpu"))
    assert built.optimization is not None
    lr_of = {
        id(p): group["lr"]
        for group in built.optimization.optimizer.param_groups
        for p in group["params"]
    }
    encoder = built.parts.encoder
    layers = backbone_layers(encoder.backbone)
    for i, layer in enumerate(layers):
        for p in layer:
            assert lr_of[id(p)] == pytest.approx(2e-3 * 0.1 * 0.5 ** (len(layers) - i))
    for p in encoder.projector.parameters():
        assert lr_of[id(p)] == pytest.approx(2e-3)


def test_without_a_backbone_rate_the_groups_are_those_of_before(registry):
    config = config_of(registry, ["components.plugin=simclr"])
    built = assemble(config, registry, image_size=32, device=torch.device("cpu"))
    assert built.optimization is not None
    names = [g["name"] for g in built.optimization.optimizer.param_groups]
    assert names == ["decay", "no_decay"]


def test_bad_weight_settings_name_the_value():
    from sslplug.config import load_config

    with pytest.raises(ConfigError, match=r"model\.pretrained must be bool or str, got 3"):
        load_config(None, ["model.pretrained=3"])
    with pytest.raises(ConfigError, match=r"optim.layer_decay 1.5 must be in \(0, 1\]"):
        load_config(None, ["optim.layer_decay=1.5"])


def test_a_run_from_weights_resumes_and_exports_once_the_file_is_gone(registry, tmp_path):
    source = tmp_path / "source"
    train_pinned(source, [*SHORT, "components.plugin=simclr"])
    weights = tmp_path / "weights.pt"
    torch.save(_backbone(registry, [f"model.pretrained={source}"]).state_dict(), weights)
    settings = [*SHORT, "components.plugin=simclr", f"model.pretrained={weights}"]
    straight = train_pinned(tmp_path / "straight", settings)
    assert straight["pretrained"] == str(weights)
    with contextlib.suppress(KeyboardInterrupt):  # stopped after epoch 1
        train_pinned(tmp_path / "resumed", settings, StopAfterEpoch(1))
    weights.unlink()  # the checkpoint holds the weights now: resume, export, eval need no file
    train_pinned(tmp_path / "resumed", settings, resume=tmp_path / "resumed")
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "resumed")
    assert main(["export", str(tmp_path / "resumed"), str(tmp_path / "backbone.pt")]) == 0
    with pytest.raises(CheckpointError, match="no such file"):  # the start is the file's
        _backbone(registry, settings)


def test_a_teacher_that_names_nothing_known_is_refused_listing_what_would_be_valid():
    with pytest.raises(ConfigError, match=r"'nosuch:thing' are neither published.*timm:NAME"):
        pretrained_backbone("nosuch:thing")
