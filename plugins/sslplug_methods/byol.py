"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020, arXiv:2006.07733).

An online network (backbone, projector, predictor) predicts the projection that a target
network (backbone and projector, an exponential moving average of the online ones) gives for
the other view of the same image. No negatives; the predictor and the slowly moving target keep
the representation from collapsing.

Loss for a pair of views, summed over both directions (Section 3.2, eq. 2):

    L = (2 - 2 cos(q(z1), z2')) + (2 - 2 cos(q(z2), z1'))

where ``q`` is the predictor, ``z`` online projections and ``z'`` target projections. After each
optimizer step the target moves: ``xi <- tau * xi + (1 - tau) * theta`` with ``tau`` rising from
``tau_base`` to 1 on a cosine schedule.

Run without a target network (``--target-update none``), the loss regresses onto the online
network's own projections with the gradient stopped, which is SimSiam (Chen & He 2021). After an
encoder without a predictor (``--plugin barlow_twins --loss byol``), the loss brings its own
predictor, sized from ``encoder.projection_dim`` and trained with the encoder.

Usage::

    sslplug run --plugin byol --set byol.tau_base=0.99
"""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, TargetUpdate, Views


@attrs.define
class BYOLSettings(sslplug.BYOLAugmentation):
    """BYOL's published recipe (Grill et al. 2020, Section 3.3 and Appendix B).

    Projector and predictor: Linear(4096)-BN-ReLU-Linear(256). EMA rate from 0.996 to 1.
    Augmentation (Table 6): crop scale 0.08-1, colour jitter 0.4/0.4/0.2/0.1 with p=0.8,
    grayscale p=0.2, blur p=1.0 and 0.1, solarisation p=0.0 and 0.2 for the two views.

    ``predictor = false`` replaces the predictor by the identity: the ablation of Table 5(b),
    which collapses without a target network (0.3% top-1 there); it is how the collapse
    warning is tested (``docs/health.md``), not a recipe.
    """

    projector_hidden_dim: int = 4096
    projection_dim: int = 256
    predictor_hidden_dim: int = 4096
    tau_base: float = attrs.field(default=0.996, validator=sslplug.unit_interval)
    predictor: bool = True


def byol_predictor(dim: int, settings: BYOLSettings) -> MLP:
    """Linear(4096)-BN-ReLU-Linear(dim), the encoder's or the one the loss brings."""
    return MLP(dim, [settings.predictor_hidden_dim], dim)


class BYOLEncoder(sslplug.PredictorEncoder):
    """Backbone, projector and predictor; all views pass through in one batched call."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: BYOLSettings) -> None:
        dim = settings.projection_dim
        projector = MLP(feature_dim, [settings.projector_hidden_dim], dim)
        head = byol_predictor(dim, settings) if settings.predictor else nn.Identity()
        super().__init__(backbone, feature_dim, projector, dim, head)


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``2 - 2 cos(prediction, target)`` averaged over the batch (eq. 2 of the paper)."""
    return (2.0 - 2.0 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


class BYOLLoss(sslplug.Loss):
    """The symmetrised BYOL loss.

    Without a target network it regresses onto the stop-gradient online projections (SimSiam).
    Given a ``predictor`` (``sslplug.loss_predictor``), it applies it to the projections
    itself: for encoders that have none.
    """

    collapse_hint = (
        "BYOL needs its predictor and its EMA target: check the target update (not 'none', "
        "byol.tau not far below 0.99), that the predictor is used, and the learning rate"
    )

    requires = frozenset({"two_views", "projection", "prediction"})

    def __init__(self, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.predictor = predictor
        if predictor is not None:
            self.requires = frozenset({"two_views", "projection"})

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> sslplug.LossResult:
        p1, p2 = sslplug.loss_predictions(outputs, self.predictor)
        z1, z2 = (target if target is not None and target.projections else outputs).projections[:2]
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return sslplug.LossResult(loss, {"cosine": 1.0 - loss.detach() / 4.0})


class BYOLTarget(sslplug.MomentumTarget):
    """The target network: a copy of the online backbone and projector, moved by EMA with
    ``tau`` on a cosine from ``tau_base`` to 1."""

    metric = "tau"

    def __init__(self, encoder: Encoder, tau_base: float) -> None:
        super().__init__(encoder, tau_base, name="the BYOL target update")
        self.tau_base = tau_base


@sslplug.hookimpl
def sslplug_settings() -> type:
    return BYOLSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: BYOLSettings, run: RunContext) -> sslplug.Augmentations:
    return settings.pipelines(run.image_size)


@sslplug.hookimpl
def sslplug_encoder(settings: BYOLSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return BYOLEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_target_update(settings: BYOLSettings, encoder: Encoder) -> TargetUpdate:
    return BYOLTarget(encoder, settings.tau_base)


@sslplug.hookimpl
def sslplug_loss(settings: BYOLSettings, encoder: Encoder) -> nn.Module:
    return BYOLLoss(sslplug.loss_predictor(encoder, "BYOL", lambda d: byol_predictor(d, settings)))
