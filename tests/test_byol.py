"""BYOL: the loss against a reference formula, the EMA update, the target's isolation."""

from __future__ import annotations

import math

import pytest
import torch
from sslplug_methods import byol

from sslplug import Outputs, Views
from sslplug.nn import SmallConvNet, cosine_tau


def reference_loss(p1, p2, z1, z2):
    """Eq. 2 of Grill et al. written out: ||p/|p| - z/|z|||^2 = 2 - 2cos, both directions."""

    def one(p, z):
        total = 0.0
        for a, b in zip(p.tolist(), z.tolist()):
            na = math.sqrt(sum(x * x for x in a))
            nb = math.sqrt(sum(x * x for x in b))
            total += sum((x / na - y / nb) ** 2 for x, y in zip(a, b))
        return total / len(p)

    return one(p1, z2) + one(p2, z1)


def _outputs(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p1, p2, z1, z2, t1, t2 = (torch.randn(n, d, generator=g) for _ in range(6))
    online = Outputs(projections=(z1, z2), predictions=(p1, p2))
    target = Outputs(projections=(t1, t2))
    return online, target


def _views(n=6):
    return Views(images=(torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))


def test_loss_matches_reference_formula():
    online, target = _outputs()
    loss, metrics = byol.BYOLLoss()(online, _views(), target)
    expected = reference_loss(*online.predictions, *target.projections)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= loss.item() <= 8.0
    assert metrics["cosine"].item() == pytest.approx(1 - expected / 4, rel=1e-5)


def test_loss_is_zero_when_predictions_match_the_other_views_targets():
    online, target = _outputs()
    z1, z2 = target.projections
    matched = Outputs(projections=online.projections, predictions=(3 * z2, 0.5 * z1))
    loss, _ = byol.BYOLLoss()(matched, _views(), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_without_target_uses_stop_gradient_online_projections():
    online, _ = _outputs()
    z1, z2 = (z.clone().requires_grad_(True) for z in online.projections)
    p1, p2 = (p.clone().requires_grad_(True) for p in online.predictions)
    loss, _ = byol.BYOLLoss()(Outputs(projections=(z1, z2), predictions=(p1, p2)), _views(), None)
    assert loss.item() == pytest.approx(reference_loss(p1, p2, z1, z2), rel=1e-5)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # SimSiam's stop-gradient
    assert p1.grad is not None and p1.grad.abs().sum() > 0


def _encoder():
    settings = byol.BYOLSettings(projector_hidden_dim=16, predictor_hidden_dim=16, projection_dim=8)
    backbone = SmallConvNet(width=4)
    return byol.BYOLEncoder(backbone, backbone.out_dim, settings)


def test_encoder_gives_projection_and_prediction_per_view():
    encoder = _encoder()
    out = encoder(Views(images=(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))))
    assert [t.shape for t in out.projections] == [(4, 8), (4, 8)]
    assert [t.shape for t in out.predictions] == [(4, 8), (4, 8)]
    assert [t.shape for t in out.features] == [(4, 32), (4, 32)]


def test_ema_moves_target_toward_online_by_one_minus_tau():
    encoder = _encoder()
    target = byol.BYOLTarget(encoder, tau_base=0.9)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.network.parameters()]
    online = [
        p.clone()
        for p in list(encoder.backbone.parameters()) + list(encoder.projector.parameters())
    ]
    metrics = target.step(encoder, step=0, total_steps=10)
    assert metrics["tau"] == pytest.approx(0.9)
    for old, new, on in zip(before, target.network.parameters(), online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * on)


def test_target_receives_no_gradient():
    encoder = _encoder()
    target = byol.BYOLTarget(encoder, tau_base=0.99)
    views = Views(images=(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)))
    with torch.no_grad():
        target_out = target(views)
    loss, _ = byol.BYOLLoss()(encoder(views), views, target_out)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in target.network.parameters())
    assert any(p.grad is not None for p in encoder.backbone.parameters())


def test_target_needs_a_projector():
    class Bare(torch.nn.Module):
        backbone = torch.nn.Identity()

    with pytest.raises(Exception, match="projector"):
        byol.BYOLTarget(Bare(), 0.99)


def test_cosine_tau_rises_from_base_to_one():
    assert cosine_tau(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_tau(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_tau(0.996, 100, 100) == pytest.approx(1.0)
