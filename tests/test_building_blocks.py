"""The shared blocks of methods with a predictor or a target network: ``PredictorEncoder`` and
``MomentumTarget``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sslplug


def _encoder(dim: int = 6) -> sslplug.PredictorEncoder:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.LazyLinear(8))
    backbone(torch.zeros(1, 3, 4, 4))  # materialise the lazy layer
    return sslplug.PredictorEncoder(backbone, 8, nn.Linear(8, dim), dim, nn.Linear(dim, dim))


def test_predictor_encoder_predicts_every_view_of_every_size():
    encoder = _encoder()
    encoder.backbone = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 8))
    views = sslplug.Views(images=(torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8),
                                  torch.randn(3, 3, 4, 4)))  # fmt: skip
    outputs = encoder(views)
    assert encoder.provides == {"projection", "prediction"}
    assert [p.shape for p in outputs.predictions] == [(3, 6)] * 3
    for z, p in zip(outputs.projections, outputs.predictions):
        torch.testing.assert_close(p, encoder.predictor(z))


def test_momentum_target_copies_backbone_and_projector_without_gradients():
    encoder = _encoder()
    target = sslplug.MomentumTarget(encoder, 0.9)
    assert all(not p.requires_grad for p in target.network.parameters())
    images = torch.randn(2, 3, 4, 4)
    out = target(sslplug.Views(images=(images,)))
    torch.testing.assert_close(out.projections[0], encoder.projector(encoder.backbone(images)))


@pytest.mark.parametrize(("schedule", "expected"), [("constant", 0.9), ("cosine", 0.95)])
def test_step_moves_the_copy_by_one_minus_the_momentum(schedule, expected):
    encoder = _encoder()
    target = sslplug.MomentumTarget(encoder, 0.9, schedule=schedule)
    before = target.network[1].weight.clone()
    with torch.no_grad():
        encoder.projector.weight.add_(1.0)
    metrics = target.step(encoder, 1, 2)  # half way: the cosine is at 0.9 + 0.1 / 2
    assert metrics == {"momentum": pytest.approx(expected)}
    moved = expected * before + (1 - expected) * encoder.projector.weight
    torch.testing.assert_close(target.network[1].weight, moved)


def test_momentum_target_refuses_an_encoder_without_a_projector():
    bare = sslplug.Encoder(nn.Identity(), 8)
    with pytest.raises(sslplug.ComponentMismatchError, match="the key encoder copies"):
        sslplug.MomentumTarget(bare, 0.99, name="the key encoder")
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant', got 'step'"):
        sslplug.MomentumTarget(_encoder(), 0.99, schedule="step")
