"""RotNet: exact rotations and labels, the loss against cross-entropy written out, the encoder."""

from __future__ import annotations

import math

import pytest
import torch
from sslplug_methods import rotnet
from torch import nn

from sslplug import Outputs, Views
from sslplug.config import RunContext, load_config
from sslplug.nn import SmallConvNet


def test_every_image_appears_in_all_four_rotations_with_exact_labels():
    batch = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    views = rotnet.RotationViews(nn.Identity())(batch)
    (images,) = views.images
    labels = views.targets["rotation"]
    assert images.shape == (12, 3, 8, 8)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    upright = batch.float() / 255
    for k in range(4):
        for i in range(3):
            copy = images[k * 3 + i]
            # rotating back by the label's quarter turns restores the image exactly
            assert torch.equal(torch.rot90(copy, -k, dims=(1, 2)), upright[i])
    # 90 degrees is counter-clockwise: the top row becomes the left column, read bottom-up
    assert torch.equal(images[3][:, :, 0], upright[0][:, 0, :].flip(-1))


def test_loss_is_cross_entropy_written_out():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g)
    labels = torch.randint(0, 4, (8,), generator=g)
    views = Views(images=(torch.zeros(8, 3, 4, 4),), targets={"rotation": labels})
    loss, metrics = rotnet.sslplug_loss()(Outputs(logits=logits), views, None)
    expected = (
        sum(
            -row[y].item() + math.log(sum(math.exp(v) for v in row.tolist()))
            for row, y in zip(logits, labels.tolist())
        )
        / 8
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["rotation_accuracy"].item() == pytest.approx(
        (logits.argmax(1) == labels).float().mean().item()
    )


def test_encoder_classifies_rotations_from_backbone_features():
    backbone = SmallConvNet(width=4)
    encoder = rotnet.RotNetEncoder(backbone, backbone.out_dim, rotnet.RotNetSettings())
    out = encoder(Views(images=(torch.randn(8, 3, 16, 16),)))
    assert out.logits.shape == (8, 4) and out.features[0].shape == (8, 32)
    assert torch.equal(
        encoder.features(torch.ones(2, 3, 16, 16)), backbone(torch.ones(2, 3, 16, 16))
    )


def test_light_augmentation_keeps_the_image_size():
    run = RunContext(config=load_config(), image_size=16)
    (pipeline,) = rotnet.sslplug_augmentation(rotnet.RotNetSettings(), run)
    out = pipeline(torch.rand(5, 3, 16, 16))
    assert out.shape == (5, 3, 16, 16)


def test_short_run_end_to_end(fast_args, tmp_path):
    import json

    from sslplug.cli import main

    args = [*fast_args, "--plugin", "rotnet"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["components"] == {
        "augmentation": "rotnet",
        "views": "rotnet",
        "encoder": "rotnet",
        "loss": "rotnet",
        "target_update": "none",
    }
    assert summary["steps"] == 4 and summary["knn_top1"] is not None
