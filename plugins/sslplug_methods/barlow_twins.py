"""Barlow Twins: redundancy reduction (Zbontar et al. 2021, arXiv:2103.03230).

The embeddings of two views, each dimension standardised over the batch, give a
cross-correlation matrix ``C`` (``d x d``); the loss (eq. 1) pushes it to the identity::

    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

The first term makes each dimension invariant to the augmentations, the second decorrelates the
dimensions, which keeps the embedding from collapsing without negatives or a target network.

Usage::

    sslplug run --plugin barlow_twins --set barlow_twins.lambda_offdiag=0.0051
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, Views


@attrs.define
class BarlowTwinsSettings(sslplug.BYOLAugmentation):
    """Barlow Twins' published recipe (Zbontar et al. 2021, Section 4 and Appendix).

    Projector: three linear layers, BN and ReLU after the first two, 8192 wide for ResNet-50's
    2048 features. ``projector_dim = 0`` scales that to four times the backbone's feature width
    (8192 for ResNet-50, 2048 for ResNet-18, 512 for the small backbone), so the projector's
    cost stays in proportion on small machines. lambda = 5e-3. Views: BYOL's two asymmetric
    pipelines, as in the paper.
    """

    projector_dim: int = 0
    lambda_offdiag: float = 5e-3


class BarlowTwinsEncoder(sslplug.ProjectorEncoder):
    """Backbone and the three-layer projector."""

    def __init__(
        self, backbone: nn.Module, feature_dim: int, settings: BarlowTwinsSettings
    ) -> None:
        width = settings.projector_dim or 4 * feature_dim
        super().__init__(backbone, feature_dim, MLP(feature_dim, [width, width], width), width)


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """``C = z1n^T z2n / N`` with each column of ``z1``, ``z2`` standardised over the batch.

    Under DDP the batch is every rank's: the column statistics and ``C`` are summed over ranks
    (``sslplug.all_reduce_sum``, with gradient), so every rank computes the whole batch's ``C``.
    """
    total = z1.shape[0] * sslplug.world_size()

    def standardise(z: Tensor) -> Tensor:
        centred = z - sslplug.all_reduce_sum(z.sum(0)) / total
        variance = sslplug.all_reduce_sum(centred.pow(2).sum(0)) / total
        return centred / (variance.sqrt() + eps)

    return sslplug.all_reduce_sum(standardise(z1).T @ standardise(z2)) / total


class BarlowTwinsLoss(sslplug.Loss):
    """Invariance on the diagonal of the cross-correlation, redundancy reduction off it."""

    collapse_hint = (
        "Barlow Twins' off-diagonal weight (barlow_twins.lambda_offdiag) may be too small, or the "
        "learning rate too high"
    )

    requires = frozenset({"two_views", "projection"})

    def __init__(self, lambda_offdiag: float) -> None:
        super().__init__()
        self.lambda_offdiag = lambda_offdiag

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> sslplug.LossResult:
        z1, z2 = outputs.projections[:2]
        # the standardisation and the d x d correlation need float32, not bf16 autocast
        with torch.autocast(z1.device.type, enabled=False):
            c = cross_correlation(z1.float(), z2.float())
        diagonal = torch.diagonal(c)
        on_diag = (1 - diagonal).pow(2).sum()
        off_diag = c.pow(2).sum() - diagonal.pow(2).sum()
        loss = on_diag + self.lambda_offdiag * off_diag
        metrics = {"on_diagonal": on_diag.detach(), "off_diagonal": off_diag.detach()}
        return sslplug.LossResult(loss, metrics)


@sslplug.hookimpl
def sslplug_settings() -> type:
    return BarlowTwinsSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: BarlowTwinsSettings, run: RunContext) -> sslplug.Augmentations:
    return settings.pipelines(run.image_size)


@sslplug.hookimpl
def sslplug_encoder(
    settings: BarlowTwinsSettings, backbone: nn.Module, feature_dim: int
) -> Encoder:
    return BarlowTwinsEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss(settings: BarlowTwinsSettings) -> nn.Module:
    return BarlowTwinsLoss(settings.lambda_offdiag)
