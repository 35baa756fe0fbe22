"""CPC: the patch grid, the context mask, InfoNCE against its formula, evaluation features."""

from __future__ import annotations

import math

import pytest
import torch
from sslplug_methods import cpc
from torch import nn

from sslplug import Views
from sslplug.nn import SmallConvNet


def test_patch_grid_of_a_32px_image_is_7x7_overlapping_8px_patches():
    assert cpc.CPCSettings().geometry(32) == (8, 4)
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    grid = cpc.extract_patches(image, 8, 4)
    assert grid.shape == (1, 7, 7, 1, 8, 8)
    assert torch.equal(grid[0, 2, 5, 0], image[0, 0, 8:16, 20:28])


def test_views_hold_every_patch_of_the_batch_and_the_grid():
    views = cpc.CPCViews(nn.Identity(), nn.Identity(), 8, 4)(
        torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    )
    assert views.images[0].shape == (2 * 49, 3, 8, 8)
    assert views.targets["grid"].tolist() == [7, 7]


def test_context_never_sees_its_own_or_a_lower_row():
    torch.manual_seed(0)
    context = cpc.MaskedContext(channels=6, layers=3)
    z = torch.randn(2, 6, 7, 7)
    base = context(z)
    for row in range(7):
        moved = z.clone()
        moved[:, :, row, 3] += 10.0  # perturb one patch vector in this row
        changed = context(moved)
        # every context position at this row or above is untouched
        assert torch.equal(changed[:, :, : row + 1], base[:, :, : row + 1]), row
        if row < 6:
            assert not torch.allclose(changed[:, :, row + 1 :], base[:, :, row + 1 :]), row


def reference_info_nce(predictions, patches):
    """Each prediction scored against every patch vector of the batch, written out."""
    steps, b, gh, gw, d = predictions.shape
    bank = patches.reshape(-1, d).tolist()
    per_step = []
    for k in range(1, steps + 1):
        terms = []
        for i in range(b):
            for r in range(1, gh - k):
                for col in range(gw):
                    q = predictions[k - 1, i, r, col].tolist()
                    scores = [sum(x * y for x, y in zip(q, z)) for z in bank]
                    true = scores[(i * gh + r + k) * gw + col]
                    terms.append(-true + math.log(sum(math.exp(s) for s in scores)))
        if terms:
            per_step.append(sum(terms) / len(terms))
    return sum(per_step) / len(per_step)


def test_info_nce_matches_the_formula_with_every_patch_a_candidate():
    g = torch.Generator().manual_seed(3)
    predictions = torch.randn(2, 2, 4, 3, 5, generator=g)
    patches = torch.randn(2, 4, 3, 5, generator=g)
    assert cpc.patch_info_nce(predictions, patches).item() == pytest.approx(
        reference_info_nce(predictions, patches), rel=1e-5
    )


def test_info_nce_is_small_when_predictions_point_at_their_patches():
    patches = torch.nn.functional.one_hot(torch.arange(2 * 5 * 3)).float().view(2, 5, 3, 30) * 20
    predictions = torch.zeros(2, 2, 5, 3, 30)
    for k in (1, 2):
        predictions[k - 1, :, : 5 - k] = patches[:, k:]
    assert cpc.patch_info_nce(predictions, patches).item() < 1e-3
    assert cpc.patch_info_nce(predictions, patches, num_negatives=8).item() < 1e-3
    assert cpc.patch_info_nce(torch.zeros_like(predictions), patches).item() == pytest.approx(
        math.log(30), rel=1e-5
    )


def test_encoder_predictions_and_whole_image_features():
    backbone = SmallConvNet(width=4)
    encoder = cpc.CPCEncoder(backbone, backbone.out_dim, cpc.CPCSettings(), 8, 4)
    views = Views(images=(torch.randn(2 * 49, 3, 8, 8),), targets={"grid": torch.tensor([7, 7])})
    out = encoder(views)
    assert out.predictions[0].shape == (3, 2, 7, 7, 32)
    assert out.extras["patches"].shape == (2, 7, 7, 32)
    images = torch.randn(2, 3, 32, 32)
    features = encoder.features(images)
    patches = cpc.extract_patches(images, 8, 4).reshape(98, 3, 8, 8)
    encoder.eval()
    expected = backbone(patches).view(2, 49, 32).mean(1)
    torch.testing.assert_close(encoder.features(images), expected)
    assert features.shape == (2, 32)


def test_short_run_end_to_end(fast_args, tmp_path):
    import json

    from sslplug.cli import main

    assert main([*fast_args, "--plugin", "cpc", "--set", "cpc.num_negatives=64"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["components"]["loss"] == "cpc" and summary["knn_top1"] is not None
