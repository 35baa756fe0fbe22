"""SimCLR: a simple framework for contrastive learning (Chen et al. 2020, arXiv:2002.05709).

Two views of each image come from the same augmentation recipe; an MLP projector maps the
backbone's features to ``z``; the NT-Xent loss (Section 2.1, eq. 1) makes each view pick out its
partner among the other ``2N - 1`` views of the batch, so the ``2N - 2`` views of other images are
its negatives::

    l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

averaged over all ``2N`` views, with ``sim`` the cosine similarity and ``t`` the temperature.

Usage::

    sslplug run --plugin simclr --set simclr.temperature=0.2
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, Views


@attrs.define
class SimCLRSettings:
    """SimCLR's CIFAR-10 recipe (Chen et al. 2020, Appendix B.9), used because the default data and
    CIFAR are small images: colour strength 0.5, temperature 0.5, no blur, a 2-layer projector
    as wide as the backbone's features with a 128-d output. For large images (``blur = "auto"``
    above 64 px) the ImageNet recipe's blur with p=0.5 is added; its colour strength is 1.0.
    """

    temperature: float = attrs.field(default=0.5, validator=sslplug.positive)
    projection_dim: int = 128
    projector_hidden_dim: int = 0  # 0: the backbone's feature width
    color_strength: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur: Literal["auto", "on", "off"] = "auto"


class SimCLREncoder(sslplug.ProjectorEncoder):
    """Backbone and projector Linear(d)-BN-ReLU-Linear(128), ``d`` the backbone's width."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: SimCLRSettings) -> None:
        hidden = settings.projector_hidden_dim or feature_dim
        projector = MLP(feature_dim, [hidden], settings.projection_dim)
        super().__init__(backbone, feature_dim, projector, settings.projection_dim)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent over ``2N`` views: row ``i`` of ``z1`` and row ``i`` of ``z2`` are positives.

    Under DDP the candidates are every rank's views (``sslplug.gather``, with gradient), the
    anchors this rank's: the mean over ranks of this loss is the loss of the whole batch.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    candidates = torch.cat([sslplug.gather(z1), sslplug.gather(z2)])
    total = candidates.shape[0] // 2
    index = torch.arange(n, device=z1.device) + sslplug.rank() * n
    itself = torch.cat([index, total + index])
    partner = torch.cat([total + index, index])
    logits = torch.cat([z1, z2]) @ candidates.T / temperature
    logits[torch.arange(2 * n, device=z1.device), itself] = float("-inf")  # not its own negative
    return F.cross_entropy(logits, partner)


class NTXentLoss(sslplug.Loss):
    """The normalised temperature-scaled cross-entropy loss of SimCLR."""

    requires = frozenset({"two_views", "projection"})

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> sslplug.LossResult:
        z1, z2 = outputs.projections[:2]
        # similarities at temperature 0.1 need more precision than bf16 autocast gives
        with torch.autocast(z1.device.type, enabled=False):
            loss = nt_xent(z1.float(), z2.float(), self.temperature)
        return sslplug.LossResult(loss, {})


@sslplug.hookimpl
def sslplug_settings() -> type:
    return SimCLRSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: SimCLRSettings, run: RunContext) -> sslplug.Augmentations:
    blur = sslplug.blur_on(settings.blur, run.image_size)
    return sslplug.simclr_recipe(
        run.image_size,
        crop_scale=settings.crop_scale,
        color_strength=settings.color_strength,
        jitter_prob=settings.jitter_prob,
        grayscale_prob=settings.grayscale_prob,
        blur_prob=0.5 if blur else 0.0,
    )


@sslplug.hookimpl
def sslplug_encoder(settings: SimCLRSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return SimCLREncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss(settings: SimCLRSettings) -> nn.Module:
    return NTXentLoss(settings.temperature)
