"""SimCLR: NT-Xent against the paper's formula, hand-checked values, the recipe and the encoder."""

from __future__ import annotations

import math

import pytest
import torch
from sslplug_methods import simclr

from sslplug import Outputs, Views
from sslplug.config import RunContext, load_config
from sslplug.nn import SmallConvNet


def reference_nt_xent(z1, z2, t):
    """Eq. 1 of Chen et al. written out: l(i, j) averaged over all 2N views."""
    z = torch.cat([z1, z2]).tolist()
    n2 = len(z)

    def sim(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denominator = sum(math.exp(sim(z[i], z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / t) / denominator)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_paper_formula(temperature):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss, _ = simclr.NTXentLoss(temperature)(Outputs(projections=(z1, z2)), _views(5), None)
    assert loss.item() == pytest.approx(reference_nt_xent(z1, z2, temperature), rel=1e-5)


def test_identical_views_with_orthogonal_negatives_give_the_hand_computed_minimum():
    n, t = 4, 0.5
    z = torch.eye(n, 8)
    loss = simclr.nt_xent(z, z.clone(), t).item()
    # positive similarity 1, the 2N-2 negatives 0: -log(e^(1/t) / (e^(1/t) + 2N - 2))
    assert loss == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / t)), rel=1e-6)
    moved = z.clone()
    moved[:, 4] = 0.5  # the second view drifts away from the first
    assert simclr.nt_xent(z, moved, t).item() > loss


def test_every_other_view_is_a_negative():
    # swapping two images between the views makes their positives negatives: the loss rises
    z1 = torch.eye(3, 6)
    swapped = z1[[1, 0, 2]]
    assert simclr.nt_xent(z1, swapped, 0.5).item() > simclr.nt_xent(z1, z1, 0.5).item() + 1


def _views(n):
    return Views(images=(torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))


def test_encoder_projector_is_as_wide_as_the_features_by_default():
    backbone = SmallConvNet(width=4)
    encoder = simclr.SimCLREncoder(backbone, backbone.out_dim, simclr.SimCLRSettings())
    assert encoder.projector[0].out_features == backbone.out_dim
    out = encoder(Views(images=(torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16))))
    assert [z.shape for z in out.projections] == [(3, 128), (3, 128)]
    assert encoder.projection_dim == 128


@pytest.mark.parametrize(("size", "blurred"), [(32, False), (96, True)])
def test_recipe_blurs_only_large_images_by_default(size, blurred):
    run = RunContext(config=load_config(), image_size=size)
    pipelines = simclr.sslplug_augmentation(simclr.SimCLRSettings(), run)
    assert len(pipelines) == 2
    names = [type(m).__name__ for m in pipelines[0]]
    assert ("RandomGaussianBlur" in names) is blurred
    jitter = next(m for m in pipelines[0] if type(m).__name__ == "ColorJitter")
    # colour strength 0.5: brightness 0.8 * 0.5 = 0.4, hue 0.2 * 0.5 = 0.1
    assert (jitter.brightness, jitter.saturation, jitter.hue) == pytest.approx((0.4, 0.4, 0.1))
