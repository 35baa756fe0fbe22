"""SwAV: swapping assignments between views (Caron et al. 2020, arXiv:2006.09882).

Every crop of an image is projected to an L2-normalised embedding ``z`` and scored against
``K`` learnable prototypes ``c_k`` (unit vectors). The *codes* ``q`` of the two global crops
are soft assignments of the batch to the prototypes that use every prototype equally often over
the batch: the Sinkhorn-Knopp solution of an entropy-regularised transport problem (Section 3.1,
eq. 3-5)::

    Q = diag(u) exp(C^T Z / eps) diag(v),   rows of Q sum to 1/K, columns to 1/B

computed with three iterations over the whole global batch (the sums over samples run over every
rank) by ``sslplug.sinkhorn_knopp``, which DINOv2's teacher centring shares. The loss then asks
every other crop to predict those codes, the *swapped prediction* (eq. 1-2)::

    L = mean over global crops s, crops t != s of  -sum_k q_s^(k) log p_t^(k)
    p_t^(k) = softmax_k(z_t . c_k / tau)

Multi-crop (Section 3.2): two global crops and several small local ones; codes come from the
global crops only, predictions from every crop. When the batch is small next to ``K`` (batch
256, Appendix), a queue of the embeddings of earlier global crops joins the batch in the
Sinkhorn-Knopp step from epoch ``epoch_queue_starts`` on, once it is full; only the codes of
the current batch are kept. The prototypes are L2-normalised before every step and frozen
during the first epoch, as the official code does (``freeze_prototypes_niters``).

Here the prototypes, the Sinkhorn-Knopp step and the queue belong to the loss: the loss works
after any encoder that provides projections (``--plugin simclr --loss swav``), its queue is a
buffer checkpointed with it, and the frozen prototypes are an optimiser rule it declares.

Usage::

    sslplug run --plugin swav --set swav.prototypes=300 --set swav.epoch_queue_starts=5
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, Views

GLOBAL = "global"
ASSIGNED_CROPS = 2  # the global crops whose codes are computed, crops_for_assign of the paper


@attrs.define
class SwAVSettings:
    """SwAV's recipe: the official code's ImageNet configuration for batch 256
    (``scripts/swav_400ep_bs256_pretrain.sh`` of facebookresearch/swav, with the paper's
    Section 4 and Appendix A), scaled to small images. Neither the paper nor its code gives a
    CIFAR recipe.

    - Head: Linear(d)-BN-ReLU-Linear(128) with ``d`` the backbone's width (``hidden_mlp`` 2048
      for ResNet-50's 2048 features; ``projector_hidden_dim = 0`` keeps that ratio), 3000
      prototypes, temperature 0.1, Sinkhorn-Knopp with epsilon 0.05 and 3 iterations.
    - Queue: 3840 embeddings of global crops (15 batches of 256), used from epoch 15 of 400.
      Published value 15; the default here is 5, a third of the 15-epoch runs of this project,
      so that short runs use it at all.
    - Prototypes frozen for the first epoch (``freeze_prototypes_niters`` 5005, one epoch at
      batch 256).
    - Multi-crop (``main_swav.py``): 2 global crops of scale 0.14-1 and 6 local crops of scale
      0.05-0.14, 96 of 224 px (``local_crop_size = 0``: 3/7 of the image side, 14 of 32 px);
      flip, colour jitter 0.8/0.8/0.8/0.2 with p=0.8 (strength 1), grayscale p=0.2, Gaussian
      blur p=0.5 on every crop, no solarisation. ``blur = "auto"`` leaves the blur out for
      images of 64 px or less, as SimCLR's CIFAR recipe does (Chen et al. 2020, Appendix B.9):
      its kernel would be 3 px.
    """

    projector_hidden_dim: int = attrs.field(default=0, validator=sslplug.non_negative)
    projection_dim: int = attrs.field(default=128, validator=sslplug.positive)
    prototypes: int = attrs.field(default=3000, validator=sslplug.positive)
    temperature: float = attrs.field(default=0.1, validator=sslplug.positive)
    epsilon: float = attrs.field(default=0.05, validator=sslplug.positive)
    sinkhorn_iterations: int = attrs.field(default=3, validator=sslplug.positive)
    queue_length: int = attrs.field(default=3840, validator=sslplug.non_negative)
    epoch_queue_starts: int = attrs.field(default=5, validator=sslplug.non_negative)
    freeze_prototypes_epochs: float = attrs.field(default=1.0, validator=sslplug.non_negative)
    local_crops: int = attrs.field(default=6, validator=sslplug.non_negative)
    local_crop_size: int = attrs.field(default=0, validator=sslplug.non_negative)
    global_scale: tuple[float, float] = attrs.field(
        default=(0.14, 1.0), validator=sslplug.scale_range
    )
    local_scale: tuple[float, float] = attrs.field(
        default=(0.05, 0.14), validator=sslplug.scale_range
    )
    color_strength: float = attrs.field(default=1.0, validator=sslplug.non_negative)
    jitter_prob: float = attrs.field(default=0.8, validator=sslplug.unit_interval)
    grayscale_prob: float = attrs.field(default=0.2, validator=sslplug.unit_interval)
    blur_prob: float = attrs.field(default=0.5, validator=sslplug.unit_interval)
    blur: Literal["auto", "on", "off"] = "auto"


class SwAVEncoder(sslplug.ProjectorEncoder):
    """Backbone and projection head Linear(d)-BN-ReLU-Linear(128); the loss normalises."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: SwAVSettings) -> None:
        hidden = settings.projector_hidden_dim or feature_dim
        projector = MLP(feature_dim, [hidden], settings.projection_dim)
        super().__init__(backbone, feature_dim, projector, settings.projection_dim)


def swapped_prediction(
    scores: tuple[Tensor, ...], codes: dict[int, Tensor], temperature: float
) -> Tensor:
    """Eq. 1-2: for each crop ``s`` with codes, the mean over every other crop ``t`` of the
    cross-entropy between ``codes[s]`` and ``softmax(scores[t] / temperature)``; averaged over
    the crops with codes."""
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    per_code = [
        torch.stack(
            [-(q * log_p[t]).sum(dim=1).mean() for t in range(len(scores)) if t != s]
        ).mean()
        for s, q in codes.items()
    ]
    return torch.stack(per_code).mean()


class SwAVLoss(sslplug.Loss):
    """The prototypes, the Sinkhorn-Knopp codes, the queue and the swapped prediction loss.

    Reads the projections of every view, L2-normalises them and scores them against the
    prototypes (a linear layer without bias whose rows are L2-normalised before every step).
    The codes of the first two ``global`` views (every view is ``global`` when the view
    generator names no groups) are computed over the whole batch and the queue; every other view
    predicts them.

    State: ``queue`` ``(2, queue_length, dim)``, one per assigned crop as in the official code,
    newest first, and ``queue_filled``, the embeddings put in it so far. From epoch
    ``epoch_queue_starts`` (0-based, ``run.progress.epoch``) every step pushes the embeddings of
    the global crops of every rank (``sslplug.gather``); once the queue is full its scores join
    the batch in the Sinkhorn-Knopp step.

    Under DDP every rank holds the same, whole queue and puts its own ``1 / world size`` share of
    the rows into the Sinkhorn-Knopp sums, so that each queued embedding counts once, as in the
    official code's per-rank queues of ``queue_length / world size``. Holding the same queue on
    every rank keeps it right where DDP broadcasts rank 0's buffers before each forward pass, and
    where a run resumes every rank from rank 0's checkpoint.
    """

    requires = frozenset({"two_views", "projection"})
    queue: Tensor
    queue_filled: Tensor

    def __init__(self, dim: int, settings: SwAVSettings, run: RunContext) -> None:
        super().__init__()
        self.prototypes = nn.Linear(dim, settings.prototypes, bias=False)
        self.settings = settings
        self.run = run
        length = settings.queue_length - settings.queue_length % sslplug.world_size()
        self.register_buffer("queue", torch.zeros(ASSIGNED_CROPS, length, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def optim_rules(self) -> sslplug.OptimRules:
        """The prototypes frozen for ``freeze_prototypes_epochs`` epochs."""
        frozen = sslplug.ParamGroup(
            self.prototypes,
            name="prototypes",
            frozen_epochs=self.settings.freeze_prototypes_epochs,
        )
        return sslplug.OptimRules(groups=(frozen,))

    def queue_active(self) -> bool:
        """Whether the queue is filled this step: from epoch ``epoch_queue_starts`` on."""
        return self.queue.shape[1] > 0 and self.run.progress.epoch >= (
            self.settings.epoch_queue_starts
        )

    @torch.no_grad()
    def codes(self, scores: Tensor, slot: int, use_queue: bool) -> Tensor:
        """The codes of one global crop's batch from its prototype scores ``(B, K)``, with this
        rank's share of the queue ``slot`` when ``use_queue``."""
        batch = scores.shape[0]
        if use_queue:
            share = self.queue.shape[1] // sslplug.world_size()
            rows = self.queue[slot, sslplug.rank() * share : (sslplug.rank() + 1) * share]
            scores = torch.cat([rows @ self.prototypes.weight.t(), scores])
        s = self.settings
        return sslplug.sinkhorn_knopp(scores, s.epsilon, s.sinkhorn_iterations)[-batch:]

    @torch.no_grad()
    def push(self, embeddings: list[Tensor]) -> None:
        """Put the newest embeddings of the assigned crops, every rank's, at the front of the
        queue."""
        length = self.queue.shape[1]
        for slot, z in enumerate(embeddings):
            newest = sslplug.gather(z.detach())
            self.queue[slot] = torch.cat([newest, self.queue[slot]])[:length]
        self.queue_filled.add_(embeddings[0].shape[0] * sslplug.world_size())

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assigned = views.indices(GLOBAL)[:ASSIGNED_CROPS]
        if len(assigned) < ASSIGNED_CROPS:
            raise ValueError(
                f"SwAV computes codes for {ASSIGNED_CROPS} global crops; the views' groups are "
                f"{views.group_names()}"
            )
        if self.training:
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        with torch.autocast(outputs.projections[0].device.type, enabled=False):
            z = [F.normalize(p.float(), dim=1) for p in outputs.projections]
            scores = tuple(self.prototypes(e) for e in z)
            active = self.training and self.queue_active()
            use_queue = active and int(self.queue_filled) >= self.queue.shape[1]
            codes = {
                i: self.codes(scores[i].detach(), slot, use_queue)
                for slot, i in enumerate(assigned)
            }
            loss = swapped_prediction(scores, codes, self.settings.temperature)
        if active:
            self.push([z[i] for i in assigned])
        metrics = {"queue_used": torch.tensor(float(use_queue))}
        return sslplug.LossResult(loss, metrics)


@sslplug.hookimpl
def sslplug_settings() -> type:
    return SwAVSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: SwAVSettings, run: RunContext) -> sslplug.Augmentations:
    """The multi-crop pipelines, grouped ``global, global, local, ...``."""
    s = settings.color_strength
    blur = settings.blur_prob if sslplug.blur_on(settings.blur, run.image_size) else 0.0
    return sslplug.multicrop_recipe(
        run.image_size,
        local_crops=settings.local_crops,
        local_size=settings.local_crop_size,
        global_scale=settings.global_scale,
        local_scale=settings.local_scale,
        jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
        jitter_prob=settings.jitter_prob,
        grayscale_prob=settings.grayscale_prob,
        blur_prob=(blur, blur, blur),
        solarize_prob=(0.0, 0.0, 0.0),
    )


@sslplug.hookimpl
def sslplug_encoder(settings: SwAVSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return SwAVEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss(settings: SwAVSettings, run: RunContext, encoder: Encoder) -> nn.Module:
    if not encoder.projection_dim:
        raise sslplug.ComponentMismatchError(
            f"the loss from plugin 'swav' scores projections against its prototypes, but the "
            f"encoder from plugin {run.components.get('encoder', '?')!r} "
            f"({type(encoder).__name__}) provides {sorted(encoder.provides) or 'nothing'} and "
            "no projection_dim; choose an encoder that provides projection"
        )
    return SwAVLoss(encoder.projection_dim, settings, run)
