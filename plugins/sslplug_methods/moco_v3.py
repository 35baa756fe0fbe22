"""MoCo v3: momentum contrast without a queue (Chen, Xie & He 2021, arXiv:2104.02057).

Two views of each image go through a query encoder (backbone, projector, predictor) and a
momentum encoder (backbone and projector, a moving average of the query encoder's). The keys
of the current batch are the negatives: no queue, as in SimCLR with a large batch. For
L2-normalised queries ``q`` and keys ``k`` of the whole global batch, Algorithm 1 of the paper
computes::

    ctr(q, k) = CrossEntropy(q k^T / t, labels) * 2t        (the label of query n is key n)
    L = ctr(q1, k2) + ctr(q2, k1)

where ``q1 = pred(proj(f(x1)))`` and ``k2 = proj_m(f_m(x2))`` (no gradient). The factor ``2t``
makes the gradient's scale independent of ``t`` (the paper's footnote on Algorithm 1). On many
ranks each rank scores its queries against every rank's keys (``sslplug.gather``) and its label
``n`` is offset by ``rank * N``; DDP's mean over ranks is then the loss of the whole batch.

After each optimizer step the momentum encoder moves by ``m``, which rises from ``m_0`` = 0.99
to 1 on a cosine schedule over the run (``--moco-m-cos`` of the official code). Heads as the
paper describes them: a 3-layer projector and a 2-layer predictor, hidden layers with batch
norm and ReLU, and an affine-free batch norm after the projector's output layer (Section 4,
"MLP heads", and the official code's ``_build_mlp``).

An encoder without a predictor (``--encoder simclr --loss moco_v3``) gets one from the loss,
trained with the encoder. The loss needs the momentum encoder's keys (``target_projection``):
without a target update the run is refused before the first step.

Usage::

    sslplug run --plugin moco_v3 --set moco_v3.temperature=1.0
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, TargetUpdate, Views


@attrs.define
class MoCoV3Settings(sslplug.BYOLAugmentation):
    """MoCo v3 on CIFAR-size images, with ResNet heads.

    Sources: the paper (Chen, Xie & He 2021, Section 4: 3-layer projector and 2-layer
    predictor, hidden layers 4096-d, output 256-d, BN in every layer; momentum from 0.99 with
    a cosine schedule; BYOL's augmentation) and solo-learn's CIFAR-10 recipe for MoCo v3
    (``scripts/pretrain/cifar/mocov3.yaml`` and ``augmentations/asymmetric.yaml``: ``t`` = 0.2,
    momentum 0.99 to 1, BYOL's asymmetric views without blur on 32 px images, solarisation p=0
    and 0.2, crop scale 0.08-1, jitter 0.4/0.4/0.2/0.1).

    Changed to be practical on a CPU: the hidden layers are 1024-d (published: 4096), since a
    4096 x 4096 middle layer of the projector multiplies a step's cost several times over on a
    small backbone. Published values that differ elsewhere: blur p=1.0 and 0.1 at ImageNet size
    (``blur_prob``); the official ResNet-50 code uses ``t`` = 1.0 and a 2-layer projector
    (``projector_layers = 2``); its ViT recipe ``t`` = 0.2 and 3 layers.
    """

    blur_prob: tuple[float, float] = (0.0, 0.0)
    projection_dim: int = attrs.field(default=256, validator=sslplug.positive)
    projector_hidden_dim: int = attrs.field(default=1024, validator=sslplug.positive)
    projector_layers: int = attrs.field(default=3, validator=sslplug.positive)
    predictor_hidden_dim: int = attrs.field(default=1024, validator=sslplug.positive)
    temperature: float = attrs.field(default=0.2, validator=sslplug.positive)
    momentum_base: float = attrs.field(default=0.99, validator=sslplug.unit_interval)


def moco_v3_projector(in_dim: int, settings: MoCoV3Settings) -> MLP:
    """``projector_layers`` Linear layers, BN-ReLU between them and an affine-free BN at the end."""
    hidden = [settings.projector_hidden_dim] * (settings.projector_layers - 1)
    return MLP(in_dim, hidden, settings.projection_dim, last_batch_norm=True)


def moco_v3_predictor(dim: int, settings: MoCoV3Settings) -> MLP:
    """Linear-BN-ReLU-Linear, without BN at the output (the ResNet predictor of the code)."""
    return MLP(dim, [settings.predictor_hidden_dim], dim)


class MoCoV3Encoder(sslplug.PredictorEncoder):
    """Backbone, projector and predictor; all views of a size pass through in one call."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: MoCoV3Settings) -> None:
        head = moco_v3_projector(feature_dim, settings)
        dim = settings.projection_dim
        super().__init__(backbone, feature_dim, head, dim, moco_v3_predictor(dim, settings))


def contrastive_loss(query: Tensor, key: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``ctr(q, k)`` of Algorithm 1: the scaled cross-entropy of this rank's queries against
    the keys of every rank, and how often a query's own key scores highest.

    ``key`` carries no gradient (the momentum encoder's); it is gathered over ranks and row
    ``n`` of this rank's queries is labelled ``rank * N + n``.
    """
    query = F.normalize(query, dim=1)
    keys = sslplug.gather(F.normalize(key.detach(), dim=1))
    logits = query @ keys.T / temperature
    n = query.shape[0]
    labels = torch.arange(n, device=query.device) + sslplug.rank() * n
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels) * (2 * temperature), accuracy


class MoCoV3Loss(sslplug.Loss):
    """``ctr(q1, k2) + ctr(q2, k1)``; given a ``predictor`` (``sslplug.loss_predictor``), it
    makes the queries itself."""

    collapse_hint = (
        "MoCo v3 needs its predictor and momentum encoder: check the target update and the "
        "learning rate"
    )

    requires = frozenset({"two_views", "prediction", "target_projection"})

    def __init__(self, temperature: float, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.predictor = predictor
        if predictor is not None:
            self.requires = frozenset({"two_views", "projection", "target_projection"})

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assert target is not None  # required capability: target_projection
        q1, q2 = sslplug.loss_predictions(outputs, self.predictor)
        k1, k2 = target.projections[:2]
        with torch.autocast(q1.device.type, enabled=False):  # logits at t = 0.2 need fp32
            loss_12, accuracy_12 = contrastive_loss(q1.float(), k2.float(), self.temperature)
            loss_21, accuracy_21 = contrastive_loss(q2.float(), k1.float(), self.temperature)
        accuracy = (accuracy_12 + accuracy_21) / 2
        return sslplug.LossResult(loss_12 + loss_21, {"positive_accuracy": accuracy})


class MomentumEncoder(sslplug.MomentumTarget):
    """A copy of the query encoder's backbone and projector, moved by a cosine momentum; it
    encodes the first two views, the ones the loss pairs."""

    def __init__(self, encoder: Encoder, momentum_base: float) -> None:
        super().__init__(encoder, momentum_base, name="the MoCo v3 momentum encoder")

    def forward(self, views: Views) -> Outputs:
        return Outputs(projections=sslplug.run_by_resolution(self.network, views.images[:2]))


@sslplug.hookimpl
def sslplug_settings() -> type:
    return MoCoV3Settings


@sslplug.hookimpl
def sslplug_augmentation(settings: MoCoV3Settings, run: RunContext) -> sslplug.Augmentations:
    return settings.pipelines(run.image_size)


@sslplug.hookimpl
def sslplug_encoder(settings: MoCoV3Settings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return MoCoV3Encoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_target_update(settings: MoCoV3Settings, encoder: Encoder) -> TargetUpdate:
    return MomentumEncoder(encoder, settings.momentum_base)


@sslplug.hookimpl
def sslplug_loss(settings: MoCoV3Settings, encoder: Encoder) -> sslplug.Loss:
    predictor = sslplug.loss_predictor(
        encoder, "MoCo v3", lambda dim: moco_v3_predictor(dim, settings)
    )
    return MoCoV3Loss(settings.temperature, predictor)
