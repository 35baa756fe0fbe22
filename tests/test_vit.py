"""Backbones through timm: ViT presets and ``timm:NAME``, their tokens, the ``patch_tokens``
capability, export into timm, layer-wise learning-rate decay, and DINO on a ViT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import sslplug
from sslplug.cli import main
from sslplug.config import load_config
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.finetune import backbone_layers, layer_decay_groups
from sslplug.nn import SmallConvNet, build_backbone
from sslplug.plugins import check_compatible
from sslplug.pretrained import build_encoder, load_run
from sslplug.vit import TimmBackbone, ViTBackbone, default_patch_size, token_backbone

from .conftest import FAST


def test_presets_are_timm_vits_with_a_grid_of_64_patches_at_32_px():
    for name, width in [("vit_micro", 128), ("vit_tiny", 192)]:
        backbone, dim = build_backbone(name, 32)
        assert isinstance(backbone, ViTBackbone) and dim == width
        assert backbone.patch_size == 4 and backbone.grid(32, 32) == (8, 8)
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, width)
    assert [default_patch_size(s) for s in (32, 64, 96, 224)] == [4, 8, 12, 16]
    assert build_backbone("vit_micro", 32, patch_size=8)[0].grid(32, 32) == (4, 4)


def test_tokens_keep_only_the_patches_asked_for_in_their_order():
    torch.manual_seed(0)
    backbone = build_backbone("vit_micro", 32)[0].eval()
    images = torch.randn(2, 3, 32, 32)
    prefix, patches = backbone.tokens(images)
    assert prefix.shape == (2, 1, 128) and patches.shape == (2, 64, 128)
    keep = torch.tensor([[5, 0, 63], [1, 2, 3]])
    seen = []
    hook = backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    _, visible = backbone.tokens(images, keep)
    hook.remove()
    assert visible.shape == (2, 3, 128) and seen == [torch.Size([2, 4, 128])]  # class token + 3
    # with every patch kept, in a shuffled order, the tokens are those of the full image: the
    # blocks mix tokens by attention, which does not care about their order
    order = torch.randperm(64).expand(2, 64)
    _, shuffled = backbone.tokens(images, order)
    assert torch.allclose(shuffled, patches[:, order[0]], atol=1e-5)
    # the pooled features: the class token after the final norm, or the mean patch token
    assert torch.allclose(backbone(images), prefix[:, 0], atol=1e-6)
    backbone.set_pool("avg")
    assert torch.allclose(backbone(images), patches.mean(1), atol=1e-6)


def test_a_vit_takes_crops_of_other_sizes():
    backbone = build_backbone("vit_micro", 32)[0]
    assert backbone(torch.randn(3, 3, 14, 14)).shape == (3, 128)  # a local crop, padded to 16
    assert backbone.grid(14, 14) == (4, 4)


def test_timm_names_and_settings_are_checked_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"timm has no model 'vit_tiny_patch4'.*close: vit_tiny"):
        build_backbone("timm:vit_tiny_patch4", 32)
    with pytest.raises(ConfigError, match=r"model.patch_size 64 must be between 1 and the image"):
        build_backbone("vit_micro", 32, patch_size=64)
    with pytest.raises(ConfigError, match=r"model.drop_path_rate 1.5 must be in"):
        build_backbone("vit_micro", 32, drop_path_rate=1.5)
    with pytest.raises(ConfigError, match=r"model.backbone 'vit_huge' is not valid; valid: small"):
        load_config(None, ["model.backbone=vit_huge"])
    with pytest.raises(ConfigError, match=r"drop_path_rate must be at least 0 and below 1"):
        load_config(None, ["model.drop_path_rate=1.5"])  # with the settings, whatever the backbone
    with pytest.raises(ConfigError, match=r"model.pool 'mean' is not valid"):
        build_backbone("vit_micro", 32)[0].set_pool("mean")


def test_a_timm_convnet_gives_pooled_features_and_no_tokens():
    backbone, dim = build_backbone("timm:resnet18", 32)
    assert isinstance(backbone, TimmBackbone) and dim == 512
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert "patch_tokens" not in backbone.provides
    with pytest.raises(ComponentMismatchError, match="MAE's encoder needs the patch tokens"):
        token_backbone(backbone, "MAE's encoder")


def test_drop_path_rate_reaches_the_blocks():
    backbone = build_backbone("vit_micro", 32, drop_path_rate=0.1)[0]
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in backbone.vit.blocks]
    assert rates[0] == 0.0 and math.isclose(
        rates[-1], 0.1, rel_tol=1e-6
    )  # timm's linear rule over depth
    assert all(
        isinstance(b.drop_path1, nn.Identity) for b in build_backbone("vit_micro", 32)[0].vit.blocks
    )


class _NeedsTokens(sslplug.Encoder):
    requires = frozenset({"patch_tokens"})


def test_a_component_that_needs_tokens_is_refused_with_a_convnet(registry):
    from sslplug.plugins import Components

    capabilities = registry.capabilities
    for name, ok in [("vit_micro", True), ("small", False), ("timm:resnet18", False)]:
        encoder = _NeedsTokens(*build_backbone(name, 32))
        parts = Components((), None, encoder, nn.Identity(), None, _sources())
        if ok:
            check_compatible(parts, capabilities, backbone=f"--backbone {name}")
        else:
            with pytest.raises(ComponentMismatchError, match=rf"requires patch_tokens.*{name}"):
                check_compatible(parts, capabilities, backbone=f"--backbone {name}")


def _sources() -> dict[str, str]:
    return {c: "test" for c in ("augmentation", "views", "encoder", "loss", "target_update")}


def test_layer_decay_scales_each_layer_from_the_output_down():
    vit = build_backbone("vit_micro", 32)[0]
    layers = backbone_layers(vit)
    assert len(layers) == 5  # embeddings, then four blocks
    assert {id(p) for p in layers[0]} == {
        id(vit.vit.cls_token),
        id(vit.vit.pos_embed),
        *(id(p) for p in vit.vit.patch_embed.parameters()),
    }
    encoder = sslplug.ProjectorEncoder(vit, 128, nn.Linear(128, 8), 8)
    groups = layer_decay_groups(encoder, 1.0, 0.5)
    assert [g["lr"] for g in groups] == [0.5**5, 0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]
    # every parameter once; the final norm and the projector learn at the full rate
    assert sum(len(g["params"]) for g in groups) == len(list(encoder.parameters()))
    assert any(p is vit.vit.norm.weight for p in groups[-1]["params"])
    resnet = torchvision.models.resnet18()
    assert len(backbone_layers(resnet)) == 5  # stem and four stages
    assert len(backbone_layers(SmallConvNet())) == 4
    assert [g["lr"] for g in layer_decay_groups(sslplug.Encoder(resnet, 512), 2.0, 1.0)] == [
        2.0
    ] * 6


def _run(shapes_folder: Path, out: Path, *extra: str) -> Path:
    args = ["run", "--data", str(shapes_folder), "--epochs", "1", "--out", str(out), *extra]
    for item in FAST:
        args += ["--set", item]
    assert main(args) == 0
    return out


@pytest.mark.slow  # two DINO steps through a 12-block ViT
def test_dino_trains_on_a_timm_vit_tiny_and_exports_into_timm(shapes_folder, tmp_path, registry):
    run = _run(
        shapes_folder,
        tmp_path / "dino",
        "--plugin",
        "dino",
        "--backbone",
        "timm:vit_tiny_patch16_224",
        "--set",
        "model.patch_size=8",
        "--set",
        "model.drop_path_rate=0.1",
        "--set",
        "dino.out_dim=64",
        "--set",
        "dino.local_crops_number=2",
        "--set",
        "knn.baseline=false",
        "--set",
        "health.baseline=false",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    trained = torch.load(run / "last.pt", weights_only=True)["encoder"]
    key = "backbone.vit.blocks.0.attn.qkv.weight"
    initial = build_encoder(
        load_run(run, registry), registry, 32, 10, torch.device("cpu"), pretrained=False
    )
    assert not torch.equal(trained[key], initial.state_dict()[key])  # the ViT learned

    out = tmp_path / "vit.pt"
    assert main(["export", str(run), str(out)]) == 0
    note = json.loads(out.with_suffix(".json").read_text())
    assert note["timm_name"] == "vit_tiny_patch16_224"
    assert note["timm_args"] == {"img_size": 32, "patch_size": 8}
    net = timm.create_model(note["timm_name"], num_classes=0, **note["timm_args"])
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    encoder = build_encoder(load_run(run, registry), registry, 32, 10, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net.eval().forward_features(x)[:, 0], encoder.features(x), atol=1e-5)
