"""MoCo v2: momentum contrast with an MLP head (Chen, Fan, Girshick & He 2020, arXiv:2003.04297).

MoCo (He et al. 2020, arXiv:1911.05722) trains a query encoder to pick, for the query ``q`` of
one view of an image, the key ``k+`` of another view of the same image among the keys of earlier
batches, kept in a queue (eq. 1, InfoNCE)::

    L_q = -log( exp(q . k+ / t) / (exp(q . k+ / t) + sum_{k in queue} exp(q . k / t)) )

Queries and keys are L2-normalised. Keys come from a key encoder, a momentum copy of the query
encoder, ``theta_k <- m theta_k + (1 - m) theta_q`` after every step (eq. 2), so that the keys
in the queue stay consistent with each other; after each step the batch's keys replace the
oldest ones. MoCo v2 adds a 2-layer MLP head (no batch norm), SimCLR-style augmentation with
blur and ``t`` = 0.2 (Section 2, Table 1).

The loss is symmetrised by default, the ``--symmetric`` option of the CIFAR-10 demo of the
official repository (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``, whose notes
report kNN 85.3% against 82.6% for the one-way loss after 200 epochs): each view serves once as
query against the other view's key, the two InfoNCE terms are added, and both views' keys are
enqueued. ``symmetric=false`` gives the paper's one-way loss (view 1 queries, view 2 keys).

State: the queue ``(queue_size, D)`` and its pointer are buffers of the key encoder (the target
update), so every checkpoint holds them. On many ranks the keys of every rank are enqueued in
rank order, so the queue is the same on every rank; the loss reads it as
``Outputs.extras["queue"]`` through the capability ``key_queue``, which only this key encoder
provides: the loss refuses a run without it before the first step.

Not done here: the paper's shuffled batch norm in the key encoder (keys are computed on
each rank's unshuffled batch). The demo reports about 4 points lost without it after 800 CIFAR
epochs; on runs of a few hundred steps the effect is small.

Usage::

    sslplug run --plugin moco_v2 --set moco_v2.queue_size=8192
    sslplug run --plugin moco_v2 --augmentation byol     # the queue loss on BYOL's views
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, TargetUpdate, Views

QUEUE = "key_queue"


@attrs.define
class MoCoV2Settings:
    """MoCo v2 scaled to CIFAR-size images.

    Sources: the MoCo v2 paper (Chen et al. 2020, Section 2 and Table 1: MLP head, ``t`` = 0.2,
    crop scale 0.2-1, colour jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, blur p=0.5)
    and the CIFAR-10 demo of the official repository (facebookresearch/moco,
    ``moco_cifar10_demo``: queue of 4096 keys, "saturated at 4096" there, momentum 0.99, its
    symmetric-loss option, no blur on 32 px images, as in SimCLR's CIFAR recipe, Chen et al.
    2020, Appendix B.9). The head's hidden layer is as wide as the backbone's features, as the
    official code builds it (2048 for ResNet-50); ``hidden_dim = 0`` means that width.

    ImageNet values, where these differ: ``queue_size`` 65536, ``momentum`` 0.999,
    ``symmetric`` false, blur with p=0.5 (``blur = "auto"`` turns it on above 64 px). The demo
    uses ``t`` = 0.1 and crop scale 0.08-1; the defaults are the paper's 0.2 and 0.2-1.
    """

    projection_dim: int = attrs.field(default=128, validator=sslplug.positive)
    hidden_dim: int = attrs.field(default=0, validator=sslplug.non_negative)
    queue_size: int = attrs.field(default=4096, validator=sslplug.positive)
    momentum: float = attrs.field(default=0.99, validator=sslplug.unit_interval)
    temperature: float = attrs.field(default=0.2, validator=sslplug.positive)
    symmetric: bool = True
    crop_scale: tuple[float, float] = attrs.field(default=(0.2, 1.0), validator=sslplug.scale_range)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = attrs.field(default=0.8, validator=sslplug.unit_interval)
    grayscale_prob: float = attrs.field(default=0.2, validator=sslplug.unit_interval)
    blur: Literal["auto", "on", "off"] = "auto"


class MoCoV2Encoder(sslplug.ProjectorEncoder):
    """Backbone and MoCo v2's head, Linear(d)-ReLU-Linear(128) without batch norm."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: MoCoV2Settings) -> None:
        hidden = settings.hidden_dim or feature_dim
        head = MLP(feature_dim, [hidden], settings.projection_dim, batch_norm=False)
        super().__init__(backbone, feature_dim, head, settings.projection_dim)


def queue_info_nce(
    query: Tensor, key: Tensor, queue: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Eq. 1 of He et al. 2020 for L2-normalised ``query`` and ``key`` ``(B, D)`` against the
    negatives ``queue`` ``(K, D)``: the mean loss, and how often the positive scores highest."""
    positive = (query * key).sum(dim=-1, keepdim=True)
    negative = query @ queue.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
    return F.cross_entropy(logits, labels), accuracy


class QueueInfoNCELoss(sslplug.Loss):
    """InfoNCE of the queries against the other view's key and the queue of earlier keys.

    Symmetric: ``L(q1, k2) + L(q2, k1)``; one-way: ``L(q1, k2)``. Each rank averages over its
    own queries; the queue is the same on every rank, so DDP's mean is the whole batch's loss.
    """

    requires = frozenset({"two_views", "projection", "target_projection", QUEUE})

    def __init__(self, temperature: float, symmetric: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assert target is not None  # required capabilities: target_projection, key_queue
        queue = target.extras["queue"]
        k1, k2 = target.projections[:2]
        with torch.autocast(queue.device.type, enabled=False):  # logits at t = 0.2 need fp32
            q1, q2 = (F.normalize(z.float(), dim=-1) for z in outputs.projections[:2])
            loss, accuracy = queue_info_nce(q1, k2, queue, self.temperature)
            if self.symmetric:
                loss_21, accuracy_21 = queue_info_nce(q2, k1, queue, self.temperature)
                loss, accuracy = loss + loss_21, (accuracy + accuracy_21) / 2
        return sslplug.LossResult(loss, {"positive_accuracy": accuracy})


class KeyEncoder(sslplug.MomentumTarget):
    """The key encoder (a momentum copy of the query encoder's backbone and head) and the queue.

    ``forward`` gives the L2-normalised keys of the first two views as ``projections`` and the
    queue as it stood before this step as ``extras["queue"]``, and keeps the keys to enqueue;
    ``step`` moves the key encoder, then enqueues them. ``queue_ptr`` is the row the next key
    goes to, the oldest key. The queue starts as random unit vectors, as in the official code.
    """

    requires = frozenset({"two_views", "projection"})
    provides = frozenset({"target_projection", QUEUE})
    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self, encoder: Encoder, queue_size: int, momentum: float, symmetric: bool = True
    ) -> None:
        super().__init__(encoder, momentum, schedule="constant", name="the MoCo v2 key encoder")
        queue = F.normalize(torch.randn(queue_size, encoder.projection_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.symmetric = symmetric
        self._pending: tuple[Tensor, ...] = ()

    def forward(self, views: Views) -> Outputs:
        keys = sslplug.run_by_resolution(self.network, views.images[:2])
        k1, k2 = (F.normalize(k.float(), dim=-1) for k in keys)
        # the keys a query is scored against: view 2's for the one-way loss, both when symmetric
        self._pending = (k1, k2) if self.symmetric else (k2,)
        return Outputs(projections=(k1, k2), extras={"queue": self.queue.clone()})

    @torch.no_grad()
    def enqueue(self, *keys: Tensor) -> None:
        """Put ``keys`` of every rank in place of the oldest ones, wrapping around the end.

        Each tensor is gathered over ranks on its own, so the queue's rows are in the order of
        one process with the whole batch: view 1's keys of all images, then view 2's.
        """
        new = torch.cat([sslplug.gather(k.contiguous()) for k in keys])
        size = self.queue.shape[0]
        new = new[-size:]  # a batch larger than the queue leaves only its last keys
        rows = (self.queue_ptr + torch.arange(new.shape[0], device=new.device)) % size
        self.queue.index_copy_(0, rows, new.to(self.queue.dtype))
        self.queue_ptr.add_(new.shape[0]).remainder_(size)

    @torch.no_grad()
    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, float]:
        super().step(encoder, step, total_steps)
        if self._pending:
            self.enqueue(*self._pending)
            self._pending = ()
        return {"momentum": self.momentum_base}


@sslplug.hookimpl
def sslplug_settings() -> type:
    return MoCoV2Settings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register(
        QUEUE,
        "target Outputs.extras['queue']: (K, D) L2-normalised keys of earlier batches from a "
        "momentum key encoder, the negatives of a contrastive loss (MoCo v2)",
    )


@sslplug.hookimpl
def sslplug_augmentation(settings: MoCoV2Settings, run: RunContext) -> sslplug.Augmentations:
    blur = sslplug.blur_on(settings.blur, run.image_size)
    return sslplug.byol_recipe(
        run.image_size,
        crop_scale=settings.crop_scale,
        jitter=settings.jitter,
        jitter_prob=settings.jitter_prob,
        grayscale_prob=settings.grayscale_prob,
        blur_prob=(0.5, 0.5) if blur else (0.0, 0.0),
        solarize_prob=(0.0, 0.0),
    )


@sslplug.hookimpl
def sslplug_encoder(settings: MoCoV2Settings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return MoCoV2Encoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_target_update(settings: MoCoV2Settings, encoder: Encoder) -> TargetUpdate:
    return KeyEncoder(encoder, settings.queue_size, settings.momentum, settings.symmetric)


@sslplug.hookimpl
def sslplug_loss(settings: MoCoV2Settings) -> sslplug.Loss:
    return QueueInfoNCELoss(settings.temperature, settings.symmetric)
