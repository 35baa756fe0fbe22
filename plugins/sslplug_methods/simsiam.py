"""SimSiam: simple Siamese representation learning (Chen & He 2021, arXiv:2011.10566).

Two views of each image go through one encoder ``f`` (backbone and projection MLP) and a
prediction MLP ``h``; each view's prediction regresses onto the other view's projection, whose
gradient is stopped (Section 3, eq. 1-4)::

    D(p, z) = - p / ||p|| . z / ||z||
    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2

with ``p = h(f(x))`` and ``z = f(x)``. There are no negatives and no momentum encoder: the
stop-gradient alone keeps the outputs from collapsing (Section 4.1). The predictor has a
bottleneck (hidden width a quarter of its input, Section 3 and Appendix B) and its learning rate
is held fixed, not decayed (Section 4.2, Table 1), which the encoder asks of the optimiser
through its ``optim_rules``.

The ``std`` metric is the mean over dimensions of the standard deviation of ``z / ||z||``: about
``1 / sqrt(d)`` while the outputs are spread, 0 when they collapse (Section 4.1, Figure 2).

Usage::

    sslplug run --plugin simsiam
    sslplug run --plugin simsiam --augmentation byol    # BYOL's views, SimSiam's networks
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, Views


def _projector_layers(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value not in (2, 3):
        raise sslplug.ConfigError(
            f"{attribute.name} must be 2 (the paper's CIFAR projector) or 3 (its ImageNet "
            f"projector), got {value!r}"
        )


@attrs.define
class SimSiamSettings:
    """SimSiam's CIFAR-10 recipe (Chen & He 2021, Appendix D), used because the default data and
    CIFAR are both small images.

    - Projector: on CIFAR two linear layers (``projector_layers = 2``), each followed by BN, ReLU
      after the first only; on ImageNet three (Section 3, "Baseline settings"). Every hidden
      and output layer is 2048 wide for ResNet-18's 512 features; ``projection_dim = 0`` scales
      that to four times the backbone's feature width (2048 for ResNet-18, 512 for the small
      backbone).
    - Predictor: Linear-BN-ReLU-Linear, hidden width a quarter of ``projection_dim`` (2048 -> 512
      -> 2048 in the paper; ``predictor_hidden_dim = 0``), its learning rate fixed
      (``fix_predictor_lr``, Section 4.2).
    - Views: MoCo v2's augmentation, as the paper uses (Appendix A): crop scale 0.2-1, colour
      jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, flip; Gaussian blur with p=0.5 on
      ImageNet, none on CIFAR (``blur = "auto"`` blurs above 64 px).
    """

    projection_dim: int = attrs.field(default=0, validator=sslplug.non_negative)
    projector_layers: int = attrs.field(default=2, validator=_projector_layers)
    predictor_hidden_dim: int = attrs.field(default=0, validator=sslplug.non_negative)
    fix_predictor_lr: bool = True
    crop_scale: tuple[float, float] = attrs.field(default=(0.2, 1.0), validator=sslplug.scale_range)
    color_strength: float = attrs.field(default=0.5, validator=sslplug.non_negative)
    jitter_prob: float = attrs.field(default=0.8, validator=sslplug.unit_interval)
    grayscale_prob: float = attrs.field(default=0.2, validator=sslplug.unit_interval)
    blur: Literal["auto", "on", "off"] = "auto"


class SimSiamEncoder(sslplug.PredictorEncoder):
    """Backbone, projection MLP (BN on every layer, the output's without affine parameters) and
    the bottleneck prediction MLP, whose learning rate the optimiser holds fixed."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: SimSiamSettings) -> None:
        dim = settings.projection_dim or 4 * feature_dim
        hidden = [dim] * (settings.projector_layers - 1)
        projector = MLP(feature_dim, hidden, dim, last_batch_norm=True)
        predictor = MLP(dim, [settings.predictor_hidden_dim or dim // 4], dim)
        super().__init__(backbone, feature_dim, projector, dim, predictor)
        self.fix_predictor_lr = settings.fix_predictor_lr

    def optim_rules(self) -> sslplug.OptimRules | None:
        if not self.fix_predictor_lr:
            return None
        return sslplug.OptimRules(
            groups=(sslplug.ParamGroup(self.predictor, name="predictor", fixed_lr=True),)
        )


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """``D(p, stopgrad(z))`` (eq. 1 with eq. 3), averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def output_std(z: Tensor) -> Tensor:
    """The mean per-dimension standard deviation of ``z / ||z||`` (Figure 2, middle)."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class SimSiamLoss(sslplug.Loss):
    """The symmetrised negative cosine with stop-gradient (eq. 4)."""

    collapse_hint = (
        "SimSiam needs its predictor and the stop-gradient on the other branch: check that both "
        "are used, and the learning rate"
    )

    requires = frozenset({"two_views", "projection", "prediction"})

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        p1, p2 = outputs.predictions[:2]
        z1, z2 = outputs.projections[:2]
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        return sslplug.LossResult(loss, {"std": output_std(z1)})


@sslplug.hookimpl
def sslplug_settings() -> type:
    return SimSiamSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: SimSiamSettings, run: RunContext) -> sslplug.Augmentations:
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
def sslplug_encoder(settings: SimSiamSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return SimSiamEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss() -> nn.Module:
    return SimSiamLoss()
