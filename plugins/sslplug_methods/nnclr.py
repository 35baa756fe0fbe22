"""NNCLR: nearest-neighbour contrastive learning (Dwibedi et al. 2021, arXiv:2104.14548).

SimCLR's positive is another view of the same image; NNCLR's is the nearest neighbour of that
view's projection in a support set ``Q``, a FIFO queue of projections of earlier batches. The
neighbour is often another image of the same kind, so the positives carry more semantic
variation than augmentation alone gives (Section 3.1).

With ``z`` the L2-normalised projections, ``p`` the predictions of the two views of ``N`` images
and ``NN(z, Q) = argmax_{q in Q} z . q`` (eq. 3), the loss of image ``i`` (eq. 2) is::

    L_i = -log( exp(NN(z1_i) . p2_i / t) / sum_k exp(NN(z1_i) . p2_k / t) )

with ``p`` normalised too and ``t`` = 0.1, and the same with the two views swapped; the two
directions are averaged. The neighbour carries no gradient: the encoder learns through the
predictions. After the loss, the first view's projections of the whole batch (every rank's,
gathered, so the support set is the same on every rank) replace the oldest rows of ``Q``.

Under DDP each rank's neighbours are contrasted with the predictions of the whole global batch
(``sslplug.gather``, with gradient), the labels offset by the rank, so that the mean of the
ranks' losses is the one-process loss of the whole batch.

The support set lives in the loss, as buffers (checkpointed, restored on resume). Until it holds
anything (the first step) a projection is its own neighbour; afterwards only the rows filled so
far are searched, so no random placeholder ever serves as a positive.

After an encoder without a predictor (``--plugin simclr --loss nnclr``), the loss brings its own
predictor, sized from ``encoder.projection_dim`` and trained with the encoder.

Usage::

    sslplug run --plugin nnclr --set nnclr.support_set_size=8192
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, Views


@attrs.define
class NNCLRSettings(sslplug.BYOLAugmentation):
    """NNCLR's recipe (Dwibedi et al. 2021, implementation details), its heads and
    augmentation as solo-learn's CIFAR config has them (``scripts/pretrain/cifar/nnclr.yaml``
    with ``augmentations/asymmetric.yaml``).

    Projector Linear(2048)-BN-ReLU-Linear(2048)-BN-ReLU-Linear(256)-BN, predictor
    Linear(4096)-BN-ReLU-Linear(256), temperature 0.1 (the paper's; solo-learn's CIFAR config
    uses 0.2). Augmentation: BYOL's (the paper's choice), at 32 px without blur as solo-learn's
    CIFAR recipe: crop scale 0.08-1, colour jitter 0.4/0.4/0.2/0.1 with p=0.8, grayscale p=0.2,
    solarisation p=0 and 0.2 for the two views.

    ``support_set_size`` differs from the published sizes (98304 on ImageNet in the paper,
    65536 on CIFAR in solo-learn): 4096 rows are 16 batches of 256 and 8% of CIFAR-10's 50,000
    images, about the paper's share of ImageNet (98304 of 1.28M, 24 batches of 4096), and 80%
    of the 5,000 images of the default data, so it fills within the first epoch and its rows are
    at most an epoch old. A support set larger than the data set holds stale copies of every
    image, which then tend to be their own neighbours; 65536 rows would take 256 of the default
    run's 285 steps to fill.
    """

    blur_prob: tuple[float, float] = (0.0, 0.0)
    projector_hidden_dim: int = attrs.field(default=2048, validator=sslplug.positive)
    projection_dim: int = attrs.field(default=256, validator=sslplug.positive)
    predictor_hidden_dim: int = attrs.field(default=4096, validator=sslplug.positive)
    temperature: float = attrs.field(default=0.1, validator=sslplug.positive)
    support_set_size: int = attrs.field(default=4096, validator=sslplug.positive)


def nnclr_projector(in_dim: int, settings: NNCLRSettings) -> MLP:
    """The paper's 3-layer projector, batch norm after every layer."""
    hidden = settings.projector_hidden_dim
    return MLP(in_dim, [hidden, hidden], settings.projection_dim, last_batch_norm=True)


def nnclr_predictor(dim: int, settings: NNCLRSettings) -> MLP:
    """The paper's 2-layer predictor, Linear(4096)-BN-ReLU-Linear(dim)."""
    return MLP(dim, [settings.predictor_hidden_dim], dim)


class NNCLREncoder(sslplug.PredictorEncoder):
    """Backbone, projector and predictor; provides projections and predictions of every view."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: NNCLRSettings) -> None:
        projector = nnclr_projector(feature_dim, settings)
        dim = settings.projection_dim
        super().__init__(backbone, feature_dim, projector, dim, nnclr_predictor(dim, settings))


def nnclr_loss(neighbours: Tensor, predictions: Tensor, temperature: float) -> Tensor:
    """Eq. 2: cross-entropy of each neighbour against every prediction of the global batch,
    its own image's being the positive.

    ``neighbours`` ``(N, D)`` are this rank's; ``predictions`` ``(N, D)`` are gathered from every
    rank with gradient, and the labels are offset by the rank, so the mean over ranks of this
    loss is the loss of the whole batch.
    """
    neighbours = F.normalize(neighbours, dim=1)
    candidates = sslplug.gather(F.normalize(predictions, dim=1))
    n = neighbours.shape[0]
    labels = torch.arange(n, device=neighbours.device) + sslplug.rank() * n
    return F.cross_entropy(neighbours @ candidates.T / temperature, labels)


class SupportSet(nn.Module):
    """A FIFO queue of L2-normalised projections and its nearest-neighbour lookup (eq. 3).

    Buffers: ``embeddings`` ``(size, dim)``; ``pointer``, the row the next projection goes to
    (the oldest); ``filled``, how many rows hold projections. Only filled rows are searched.
    """

    embeddings: Tensor
    pointer: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """The filled row of the support set with the largest dot product with each row of the
        normalised ``z``; ``z`` itself (detached) while the support set is empty. Nothing is
        read back to the host: unfilled rows are masked rather than sliced off."""
        scores = z @ self.embeddings.T
        unfilled = torch.arange(self.embeddings.shape[0], device=z.device) >= self.filled
        neighbours = self.embeddings[scores.masked_fill(unfilled, -torch.inf).argmax(dim=1)]
        return torch.where(self.filled > 0, neighbours, z.detach())

    @torch.no_grad()
    def push(self, z: Tensor) -> None:
        """Put every rank's ``z`` (gathered, in rank order) in place of the oldest rows,
        wrapping around the end; a batch larger than the support set leaves its last rows."""
        z = sslplug.gather(z.detach())
        size = self.embeddings.shape[0]
        z = z[-size:]
        rows = (self.pointer + torch.arange(z.shape[0], device=z.device)) % size
        self.embeddings.index_copy_(0, rows, z.to(self.embeddings.dtype))
        self.pointer.add_(z.shape[0]).remainder_(size)
        self.filled.add_(z.shape[0]).clamp_(max=size)


class NNCLRLoss(sslplug.Loss):
    """The symmetrised NNCLR loss, and the support set it searches and fills.

    Given a ``predictor`` (``sslplug.loss_predictor``), it applies it to the projections itself:
    for encoders that have none.
    In training mode each call pushes the first view's projections into the support set.
    """

    collapse_hint = (
        "NNCLR needs its predictor and a queue of varied neighbours: check the learning rate and "
        "the queue size"
    )

    requires = frozenset({"two_views", "projection", "prediction"})

    def __init__(
        self,
        temperature: float,
        support_set_size: int,
        dim: int,
        predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.support_set = SupportSet(support_set_size, dim)
        self.predictor = predictor
        if predictor is not None:
            self.requires = frozenset({"two_views", "projection"})

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        z1, z2 = outputs.projections[:2]
        p1, p2 = sslplug.loss_predictions(outputs, self.predictor)
        # similarities at temperature 0.1 need more precision than bf16 autocast gives
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = (F.normalize(z.detach().float(), dim=1) for z in (z1, z2))
            nn1, nn2 = self.support_set.nearest(z1), self.support_set.nearest(z2)
            loss1 = nnclr_loss(nn1, p2.float(), self.temperature)
            loss2 = nnclr_loss(nn2, p1.float(), self.temperature)
            similarity = ((nn1 * z1).sum(1).mean() + (nn2 * z2).sum(1).mean()) / 2
        if self.training:  # a loss measured in eval mode reads the support set, fills nothing
            self.support_set.push(z1)
        return sslplug.LossResult((loss1 + loss2) / 2, {"neighbour_cosine": similarity})


@sslplug.hookimpl
def sslplug_settings() -> type:
    return NNCLRSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: NNCLRSettings, run: RunContext) -> sslplug.Augmentations:
    return settings.pipelines(run.image_size)


@sslplug.hookimpl
def sslplug_encoder(settings: NNCLRSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return NNCLREncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss(settings: NNCLRSettings, encoder: Encoder) -> sslplug.Loss:
    dim = sslplug.projection_dim_for(encoder, "NNCLR")  # the support set's width
    predictor = sslplug.loss_predictor(encoder, "NNCLR", lambda d: nnclr_predictor(d, settings))
    return NNCLRLoss(settings.temperature, settings.support_set_size, dim, predictor)
