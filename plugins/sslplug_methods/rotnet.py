"""RotNet: predict the rotation applied to an image (Gidaris et al. 2018, arXiv:1803.07728).

Every image of the batch appears in all four rotations, 0, 90, 180 and 270 degrees, labelled
0 to 3 (Section 2.2: feeding all four rotations at once worked best); the backbone and a
classifier learn to tell which rotation each copy received, with cross-entropy. Recognising
"upright" needs knowing what objects look like, which is the representation being learned.
Before rotating, a light augmentation (random resized crop with scale 0.5-1 and a horizontal
flip) keeps the task from being solved by memorising images. The loss of an image ``x``
(Section 2.1, eq. 1-2), with ``F_y`` the classifier's probability of rotation ``y``::

    L(x) = -1/4 sum_{y=0..3} log F_y(rot(x, 90 y degrees))

Usage::

    sslplug run --plugin rotnet
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor, nn

import sslplug
from sslplug import Encoder, Outputs, RunContext, Views

ROTATIONS = 4


@attrs.define
class RotNetSettings:
    """RotNet's recipe: all four rotations of every image, a linear rotation classifier on the
    backbone's pooled features, a light crop (scale ``crop_scale``) and flip before rotating."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    classifier_hidden_dim: int = 0  # 0: a linear classifier


class RotationViews(sslplug.ViewGenerator):
    """One view holding the ``4B`` rotated copies, rotation-major; targets ``"rotation"``."""

    requires = frozenset({"normalized_views"})
    provides = frozenset({"rotation_labels"})

    def __init__(self, augmentation: nn.Module) -> None:
        super().__init__()
        self.augmentation = augmentation

    def forward(self, batch: Tensor) -> Views:
        images = self.augmentation(sslplug.to_float(batch))
        rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
        labels = torch.arange(ROTATIONS, device=batch.device).repeat_interleave(batch.shape[0])
        return Views(images=(rotated,), targets={"rotation": labels})


class RotNetEncoder(Encoder):
    """Backbone and the rotation classifier."""

    provides = frozenset({"logits"})

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: RotNetSettings) -> None:
        super().__init__(backbone, feature_dim)
        hidden_dim = settings.classifier_hidden_dim
        self.classifier = (
            sslplug.MLP(feature_dim, [hidden_dim], ROTATIONS)
            if hidden_dim
            else nn.Linear(feature_dim, ROTATIONS)
        )

    def forward(self, views: Views) -> Outputs:
        features = self.backbone(views.images[0])
        return Outputs(features=(features,), logits=self.classifier(features))


@sslplug.hookimpl
def sslplug_settings() -> type:
    return RotNetSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: RotNetSettings, run: RunContext) -> sslplug.Augmentations:
    return sslplug.Augmentations([sslplug.crop_flip_recipe(run.image_size, settings.crop_scale)])


@sslplug.hookimpl
def sslplug_views(augmentations: tuple[nn.Module, ...]) -> sslplug.ViewGenerator:
    return RotationViews(augmentations[0])


@sslplug.hookimpl
def sslplug_encoder(settings: RotNetSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return RotNetEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss() -> nn.Module:
    return sslplug.PretextCrossEntropy("rotation", "rotation_labels")
