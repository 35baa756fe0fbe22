"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun 2022,
arXiv:2105.04906).

Two views of each image go through the backbone and an *expander* MLP; the loss on the two
embeddings ``Z``, ``Z'`` (``n x d``) has three terms (Section 3)::

    L = lambda * s(Z, Z') + mu * (v(Z) + v(Z')) / 2 + nu * (c(Z) + c(Z'))

    s(Z, Z') = 1/n sum_i ||z_i - z'_i||^2 / d              invariance (mean squared error)
    v(Z)     = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps))   variance hinge (eq. 1)
    c(Z)     = 1/d sum_{i != j} [C(Z)]_ij^2                 covariance (eq. 3-4),
    C(Z)     = 1/(n - 1) sum_i (z_i - mean z)(z_i - mean z)^T

with ``gamma = 1``, ``eps = 1e-4``, ``lambda = mu = 25`` and ``nu = 1``. The variance term keeps
every dimension alive (no collapse), the covariance term decorrelates the dimensions, and no
negatives, target network or stop-gradient are needed.

The variance term is the two views' *mean* hinge, as the official ``main_vicreg.py`` computes it
(``std_loss``: each view's hinge halved), the code the published results come from; eq. 6 of
the paper writes their sum, which weighs the term twice as much. ``variance_term = "paper"``
gives eq. 6. The covariance term is the sum over the two views in both.

Variance and covariance are statistics of the batch. Under DDP the embeddings of every rank are
gathered with their gradient (``sslplug.gather``), as the official code does, so every rank
computes the loss of the whole batch and DDP's average of the gradients is its gradient.

Usage::

    sslplug run --plugin vicreg --set vicreg.covariance_weight=2
    sslplug run --plugin vicreg --set vicreg.variance_term=paper   # eq. 6's sum of the hinges
    sslplug run --plugin simclr --loss vicreg          # SimCLR's encoder and views, VICReg's loss
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
class VICRegSettings(sslplug.BYOLAugmentation):
    """VICReg's published recipe (Bardes et al. 2022, Section 4.1 and Appendix C.1; the official
    ``main_vicreg.py``: ``--mlp 8192-8192-8192 --sim-coeff 25 --std-coeff 25 --cov-coeff 1``).

    The paper gives an ImageNet recipe only. Expander: three linear layers, BN and ReLU after the
    first two, 8192 wide for ResNet-50's 2048 features; ``expander_dim = 0`` scales that to four
    times the backbone's feature width (8192 for ResNet-50, 2048 for ResNet-18, 512 for the
    small backbone), as Barlow Twins' projector, which VICReg's follows. Views: BYOL's two
    asymmetric pipelines (Appendix C.1), the defaults of ``sslplug.BYOLAugmentation``.
    Loss weights lambda = mu = 25, nu = 1, gamma = 1, eps = 1e-4 (Section 4.1).
    ``variance_term``: ``"official"`` weighs the mean of the two views' variance hinges, as
    ``main_vicreg.py`` does; ``"paper"`` their sum, as eq. 6 writes it (twice the weight).
    """

    expander_dim: int = attrs.field(default=0, validator=sslplug.non_negative)
    invariance_weight: float = attrs.field(default=25.0, validator=sslplug.non_negative)
    variance_weight: float = attrs.field(default=25.0, validator=sslplug.non_negative)
    covariance_weight: float = attrs.field(default=1.0, validator=sslplug.non_negative)
    gamma: float = attrs.field(default=1.0, validator=sslplug.positive)
    eps: float = attrs.field(default=1e-4, validator=sslplug.positive)
    variance_term: Literal["official", "paper"] = "official"


class VICRegEncoder(sslplug.ProjectorEncoder):
    """Backbone and the three-layer expander Linear-BN-ReLU-Linear-BN-ReLU-Linear."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: VICRegSettings) -> None:
        width = settings.expander_dim or 4 * feature_dim
        expander = MLP(feature_dim, [width, width], width)
        super().__init__(backbone, feature_dim, expander, width)


def variance(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """``v(Z)`` (eq. 1): the mean hinge on the standard deviation of each dimension."""
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance(z: Tensor) -> Tensor:
    """``c(Z)`` (eq. 4): the squared off-diagonal covariances summed, over the dimension."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_terms(
    z1: Tensor, z2: Tensor, gamma: float = 1.0, eps: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor]:
    """The invariance ``s``, variance ``v(Z) + v(Z')`` and covariance ``c(Z) + c(Z')`` terms, as
    eq. 6 writes them (the official weighting halves the variance sum: ``VICRegLoss``).

    Under DDP every rank's embeddings are gathered first (with gradient), so every rank computes
    the terms of the whole batch.
    """
    z1, z2 = sslplug.gather(z1), sslplug.gather(z2)
    invariance = F.mse_loss(z1, z2)
    var = variance(z1, gamma, eps) + variance(z2, gamma, eps)
    cov = covariance(z1) + covariance(z2)
    return invariance, var, cov


class VICRegLoss(sslplug.Loss):
    """The VICReg loss on the first two views' projections, in float32, with the variance term
    weighted as ``settings.variance_term`` says.

    The logged ``variance`` is the term ``mu`` multiplies (the mean of the two hinges, or their
    sum under ``"paper"``), so ``loss = lambda * invariance + mu * variance + nu * covariance``.
    """

    collapse_hint = (
        "VICReg's variance term may be too weak (vicreg.variance_weight), or the learning rate "
        "too high"
    )

    requires = frozenset({"two_views", "projection"})

    def __init__(self, settings: VICRegSettings) -> None:
        super().__init__()
        self.invariance_weight = settings.invariance_weight
        self.variance_weight = settings.variance_weight
        self.covariance_weight = settings.covariance_weight
        self.gamma = settings.gamma
        self.eps = settings.eps
        self.variance_term = settings.variance_term

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        z1, z2 = outputs.projections[:2]
        # the variances and the d x d covariance need float32, not bf16 autocast
        with torch.autocast(z1.device.type, enabled=False):
            invariance, var, cov = vicreg_terms(z1.float(), z2.float(), self.gamma, self.eps)
        if self.variance_term == "official":
            var = var / 2  # main_vicreg.py's std_loss: the mean of the two views' hinges
        loss = (
            self.invariance_weight * invariance
            + self.variance_weight * var
            + self.covariance_weight * cov
        )
        metrics = {
            "invariance": invariance.detach(),
            "variance": var.detach(),
            "covariance": cov.detach(),
        }
        return sslplug.LossResult(loss, metrics)


@sslplug.hookimpl
def sslplug_settings() -> type:
    return VICRegSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: VICRegSettings, run: RunContext) -> sslplug.Augmentations:
    return settings.pipelines(run.image_size)


@sslplug.hookimpl
def sslplug_encoder(settings: VICRegSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return VICRegEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss(settings: VICRegSettings) -> nn.Module:
    return VICRegLoss(settings)
