"""Barlow Twins: the loss against eq. 1 written out, hand-checked values, the projector's size."""

from __future__ import annotations

import math

import pytest
import torch
from sslplug_methods import barlow_twins as bt

from sslplug import Outputs, Views
from sslplug.nn import SmallConvNet


def reference_loss(z1, z2, lam):
    """Zbontar et al. eq. 1 with C_ij = sum_b z1n_bi z2n_bj / N, columns standardised."""
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])

    def standardise(rows):
        cols = []
        for j in range(d):
            col = [r[j] for r in rows]
            mean = sum(col) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in col) / n)
            cols.append([(x - mean) / (std + 1e-5) for x in col])
        return cols

    ca, cb = standardise(a), standardise(b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(x * y for x, y in zip(ca[i], cb[j])) / n
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


def _views(n):
    return Views(images=(torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))


@pytest.mark.parametrize("lam", [5e-3, 1.0])
def test_loss_matches_eq_1(lam):
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    loss, metrics = bt.BarlowTwinsLoss(lam)(Outputs(projections=(z1, z2)), _views(16), None)
    assert loss.item() == pytest.approx(reference_loss(z1, z2, lam), rel=1e-4)
    assert (metrics["on_diagonal"] + lam * metrics["off_diagonal"]).item() == pytest.approx(
        loss.item(), rel=1e-5
    )


def test_identical_decorrelated_views_give_zero_and_collapse_is_penalised():
    # columns +-1 patterns that are orthogonal and zero-mean: C is the identity
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    loss, _ = bt.BarlowTwinsLoss(5e-3)(Outputs(projections=(z, z.clone())), _views(4), None)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # two identical dimensions: C_01 = 1 off the diagonal costs lambda twice
    redundant = torch.stack([z[:, 0], z[:, 0]], dim=1)
    loss, _ = bt.BarlowTwinsLoss(0.5)(Outputs(projections=(redundant, redundant)), _views(4), None)
    assert loss.item() == pytest.approx(2 * 0.5, rel=1e-4)


def test_projector_is_three_layers_four_times_the_feature_width():
    backbone = SmallConvNet(width=4)
    encoder = bt.BarlowTwinsEncoder(backbone, backbone.out_dim, bt.BarlowTwinsSettings())
    linears = [m for m in encoder.projector if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [4 * backbone.out_dim] * 3
    assert encoder.projection_dim == 4 * backbone.out_dim
