"""The objects that flow between components in one training step, and their base classes.

One step of training is::

    views   = view_generator(batch)                  # Views
    outputs = encoder(views)                         # Outputs
    target  = target_update(views)  (no grad)        # Outputs, or None without a target network
    loss, metrics = loss_fn(outputs, views, target)
    ... backward, optimizer step ...
    target_update.step(encoder, step, total_steps)

Components say what they need and what they give through two class attributes, ``requires``
and ``provides``: sets of capability names (the table below). The core checks a mix of
components at set-up, before the first step, so that an incompatible mix fails with a message
naming both components instead of a shape error deep inside the loss.

=====================  ==============  ==========================================================
capability             provided by     meaning
=====================  ==============  ==========================================================
``two_views``          view generator  ``Views.images`` holds at least two augmented views of
                                       the same images, in the same order
``rotation_labels``    view generator  ``Views.targets["rotation"]``: the rotation id (0-3, in
                                       quarter turns) of every image of ``Views.images[0]``
``permutation_labels`` view generator  ``Views.targets["permutation"]``: the id of the
                                       permutation that shuffled each image's tiles
``patch_grid``         view generator  ``Views.images[0]`` holds every patch of the batch,
                                       image-major, row-major; ``targets["grid"]`` its shape
``projection``         encoder         ``Outputs.projections`` holds one tensor per view
``prediction``         encoder         ``Outputs.predictions`` holds one tensor per view
``logits``             encoder         ``Outputs.logits`` holds pretext-task logits
``patch_predictions``  encoder         ``Outputs.predictions[0]``: ``(K, B, gh, gw, D)``, the
                                       prediction of the patch ``k`` rows below each position;
                                       ``extras["patches"]``: ``(B, gh, gw, D)`` patch vectors
``target_projection``  target update   its ``Outputs.projections`` holds one tensor per view
=====================  ==============  ==========================================================

Plugins may add capability names of their own; a name is only a promise between components.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CAPABILITIES",
    "Encoder",
    "Outputs",
    "PretextCrossEntropy",
    "ProjectorEncoder",
    "TargetUpdate",
    "ViewGenerator",
    "Views",
]

CAPABILITIES: dict[str, str] = {
    "two_views": "at least two augmented views of the same images",
    "rotation_labels": "Views.targets['rotation']: quarter turns applied to each image",
    "permutation_labels": "Views.targets['permutation']: the permutation id of each image",
    "patch_grid": "every patch of the batch in Views.images[0]; Views.targets['grid']",
    "patch_predictions": "per-step patch predictions and the patch vectors (CPC)",
    "projection": "projector outputs, one tensor per view",
    "prediction": "predictor outputs, one tensor per view",
    "logits": "pretext-task logits",
    "target_projection": "target-network projections, one tensor per view",
}


@attrs.define
class Views:
    """What the encoder sees in one step.

    Attributes:
        images: one float tensor ``(B, C, H, W)`` per view, normalised, on the device.
        targets: pretext labels by name (``"rotation"``: ``(B,)`` int64, and so on).
    """

    images: tuple[Tensor, ...]
    targets: dict[str, Tensor] = attrs.Factory(dict)

    @property
    def batch_size(self) -> int:
        return self.images[0].shape[0]


@attrs.define
class Outputs:
    """What an encoder (or a target network) computes from ``Views``.

    Every field is optional; the encoder's ``provides`` says which ones it fills.

    Attributes:
        features: backbone features, one tensor ``(B, D)`` per view.
        projections: projector outputs, one per view.
        predictions: predictor outputs, one per view.
        logits: pretext-task logits.
        extras: anything else a matching loss understands, by name.
    """

    features: tuple[Tensor, ...] = ()
    projections: tuple[Tensor, ...] = ()
    predictions: tuple[Tensor, ...] = ()
    logits: Tensor | None = None
    extras: dict[str, Tensor] = attrs.Factory(dict)


class ViewGenerator(nn.Module):
    """Turns a uint8 batch ``(B, C, H, W)`` on the device into ``Views``.

    Subclasses implement ``forward``. It is an ``nn.Module`` so that augmentation modules it
    holds move with ``.to(device)``.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    def forward(self, batch: Tensor) -> Views:  # pragma: no cover - interface
        raise NotImplementedError


class Encoder(nn.Module):
    """The backbone plus a method's heads.

    ``forward(views)`` returns ``Outputs``. ``features(images)`` gives the features of whole,
    un-augmented images that evaluation (kNN, linear probe) uses; the default is the backbone's
    pooled output, and methods whose backbone sees parts of an image (patches, tiles) override it.

    Attributes:
        backbone: the network whose features are the product of pre-training.
        feature_dim: the width of ``features(images)``.
        projection_dim: the width of ``Outputs.projections`` for encoders that provide
            ``projection`` (0 otherwise), so that a loss from another plugin can size its own
            heads.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projection_dim = 0

    def forward(self, views: Views) -> Outputs:  # pragma: no cover - interface
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        return self.backbone(images)


class ProjectorEncoder(Encoder):
    """A backbone followed by a projector head, all views in one batched call.

    The encoder of SimCLR and Barlow Twins; BYOL's adds a predictor. Provides ``projection``.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"projection"})

    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: nn.Module, projection_dim: int
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = projector
        self.projection_dim = projection_dim

    def forward(self, views: Views) -> Outputs:
        sizes = [v.shape[0] for v in views.images]
        features = self.backbone(torch.cat(views.images))
        return Outputs(
            features=features.split(sizes), projections=self.projector(features).split(sizes)
        )


class PretextCrossEntropy(nn.Module):
    """Cross-entropy of ``Outputs.logits`` against the pretext labels ``Views.targets[name]``.

    The loss of every classification pretext task (RotNet's rotations, Jigsaw's permutations);
    it logs the classifier's accuracy as ``{name}_accuracy``. ``capability`` is what the view
    generator must provide for those labels.
    """

    def __init__(self, name: str, capability: str) -> None:
        super().__init__()
        self.name = name
        self.requires = frozenset({capability, "logits"})

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        labels = views.targets[self.name]
        loss = F.cross_entropy(outputs.logits.float(), labels)
        accuracy = (outputs.logits.detach().argmax(1) == labels).float().mean()
        return loss, {f"{self.name}_accuracy": accuracy}


class TargetUpdate(nn.Module):
    """Owns a target network: computes its outputs and updates it after each optimizer step.

    ``forward(views)`` is called under ``torch.no_grad()``. ``step(encoder, step, total_steps)``
    is called after every optimizer step, with ``step`` counted from 0 to ``total_steps - 1``;
    it returns scalar metrics to log (BYOL returns ``{"tau": ...}``). The target network's
    parameters must not be trained by the optimizer: keep ``requires_grad`` off.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    def forward(self, views: Views) -> Outputs:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - interface
