"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun, ICLR 2022).

A loss-only plugin, registered as ``vicreg_loss`` (``vicreg`` is sslplug's built-in method,
which also brings VICReg's expander and views): it needs two views and projections, so it mixes
with any encoder that provides them::

    sslplug run --plugin byol --loss vicreg_loss --target-update none
    sslplug run --plugin simclr --loss vicreg_loss

The loss (the paper's eq. 6) is ``lambda_ * s + mu * (v(z1) + v(z2)) + nu * (c(z1) + c(z2))``
with ``s`` the mean squared distance between the two views' projections, ``v`` the hinge on
the standard deviation of every dimension (``mean(relu(gamma - sqrt(var + eps)))``, gamma 1),
and ``c`` the sum of the squared off-diagonal covariances divided by the dimension. The
defaults are the paper's: lambda_ = mu = 25, nu = 1.

Variance and covariance are statistics of the batch: under DDP the loss gathers every rank's
projections first, with their gradient (``sslplug.gather``), as the official code does. Each
rank then computes the loss of the whole batch, and DDP's average of the ranks' gradients is
that loss's gradient; computed per rank, the statistics would be those of a smaller batch.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug


@attrs.define
class VICRegSettings:
    """The weights of the three terms and the variance target (Bardes et al. 2022, Section 4)."""

    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0
    gamma: float = 1.0


def variance(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance(z: Tensor) -> Tensor:
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
    return off_diagonal / d


class VICRegLoss(sslplug.Loss):
    """The VICReg loss on the first two views' projections of the whole batch, in float32."""

    requires = frozenset({"two_views", "projection"})

    def __init__(self, settings: VICRegSettings) -> None:
        super().__init__()
        self.settings = settings

    def forward(
        self, outputs: sslplug.Outputs, views: sslplug.Views, target: sslplug.Outputs | None
    ) -> sslplug.LossResult:
        s = self.settings
        with torch.autocast(outputs.projections[0].device.type, enabled=False):
            z1, z2 = (sslplug.gather(z.float()) for z in outputs.projections[:2])
            invariance = F.mse_loss(z1, z2)
            var = variance(z1, s.gamma) + variance(z2, s.gamma)
            cov = covariance(z1) + covariance(z2)
        loss = (
            s.invariance_weight * invariance + s.variance_weight * var + s.covariance_weight * cov
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
def sslplug_loss(settings: VICRegSettings) -> nn.Module:
    return VICRegLoss(settings)
