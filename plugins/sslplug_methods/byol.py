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
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, TargetUpdate, Views


def _unit_interval(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise sslplug.ConfigError(f"{attribute.name} must be between 0 and 1, got {value!r}")


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
    tau_base: float = attrs.field(default=0.996, validator=_unit_interval)
    predictor: bool = True


class BYOLEncoder(sslplug.PredictorEncoder):
    """Backbone, projector and predictor; all views pass through in one batched call."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: BYOLSettings) -> None:
        dim = settings.projection_dim
        projector = MLP(feature_dim, [settings.projector_hidden_dim], dim)
        predictor = (
            MLP(dim, [settings.predictor_hidden_dim], dim) if settings.predictor else nn.Identity()
        )
        super().__init__(backbone, feature_dim, projector, dim, predictor)


class BYOLTarget(sslplug.MomentumTarget):
    """The target network: a copy of the online backbone and projector, moved by EMA with
    ``tau`` on a cosine from ``tau_base`` to 1."""

    metric = "tau"

    def __init__(self, encoder: Encoder, tau_base: float) -> None:
        super().__init__(encoder, tau_base, name="the BYOL target update")
        self.tau_base = tau_base


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """``2 - 2 cos(prediction, target)`` averaged over the batch (eq. 2 of the paper)."""
    return (2.0 - 2.0 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


class BYOLLoss(sslplug.Loss):
    """The symmetrised BYOL loss.

    Without a target network it regresses onto the stop-gradient online projections (SimSiam).
    Given a ``predictor``, it applies it to the projections itself: for encoders that have none.
    """

    requires = frozenset({"two_views", "projection", "prediction"})

    def __init__(self, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.predictor = predictor
        if predictor is not None:
            self.requires = frozenset({"two_views", "projection"})

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> sslplug.LossResult:
        if self.predictor is not None:
            sizes = [z.shape[0] for z in outputs.projections[:2]]
            p1, p2 = self.predictor(torch.cat(outputs.projections[:2])).split(sizes)
        else:
            p1, p2 = outputs.predictions[:2]
        z1, z2 = (target if target is not None and target.projections else outputs).projections[:2]
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return sslplug.LossResult(loss, {"cosine": 1.0 - loss.detach() / 4.0})


@sslplug.hookimpl
def sslplug_settings() -> type:
    return BYOLSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: BYOLSettings, run: RunContext) -> sslplug.Augmentations:
    return settings.pipelines(run.image_size)


@sslplug.hookimpl
def sslplug_views(augmentations: tuple[nn.Module, ...]) -> sslplug.ViewGenerator:
    return sslplug.MultiViewGenerator(augmentations)


@sslplug.hookimpl
def sslplug_encoder(settings: BYOLSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return BYOLEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss(settings: BYOLSettings, encoder: Encoder) -> nn.Module:
    if "prediction" in encoder.provides:
        return BYOLLoss()
    if not encoder.projection_dim:
        raise sslplug.ComponentMismatchError(
            f"the BYOL loss needs projections: the encoder {type(encoder).__name__} provides "
            f"{sorted(encoder.provides) or 'nothing'} and no projection_dim"
        )
    dim = encoder.projection_dim
    return BYOLLoss(predictor=MLP(dim, [settings.predictor_hidden_dim], dim))


@sslplug.hookimpl
def sslplug_target_update(settings: BYOLSettings, encoder: Encoder) -> TargetUpdate:
    return BYOLTarget(encoder, settings.tau_base)
