"""Augmentation recipes as kornia modules, batched on the device, and the generic view generator.

Every recipe maps a float batch ``(B, C, H, W)`` in ``[0, 1]`` to an augmented, normalised batch,
drawing its random parameters per sample. Methods share these recipes, so a third-party plugin
gets the same BYOL pipeline as the built-in one by calling ``byol_recipe``.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import kornia.augmentation as K
import torch
from torch import Tensor, nn

from sslplug.components import ViewGenerator, Views

__all__ = [
    "MEAN",
    "STD",
    "BYOLAugmentation",
    "MultiViewGenerator",
    "Normalization",
    "blur_kernel_size",
    "byol_recipe",
    "crop_flip_recipe",
    "denormalize",
    "normalize",
    "simclr_recipe",
    "to_float",
]

# ImageNet statistics: the usual choice, and the one torchvision's pretrained weights expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_float(batch: Tensor) -> Tensor:
    """uint8 ``(B, C, H, W)`` to float in ``[0, 1]``, on the batch's device."""
    if batch.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got dtype {batch.dtype}")
    return batch.float().div_(255.0)


def normalize(images: Tensor) -> Tensor:
    """Standardise float images in ``[0, 1]`` with ``MEAN`` and ``STD`` (every recipe ends so)."""
    mean = images.new_tensor(MEAN[: images.shape[1]]).view(1, -1, 1, 1)
    std = images.new_tensor(STD[: images.shape[1]]).view(1, -1, 1, 1)
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Invert ``normalize`` and clamp to ``[0, 1]``, for showing augmented views."""
    mean = images.new_tensor(MEAN[: images.shape[1]]).view(1, -1, 1, 1)
    std = images.new_tensor(STD[: images.shape[1]]).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


def blur_kernel_size(image_size: int) -> int:
    """An odd kernel of about 10% of the image side, as SimCLR and BYOL use (23 px at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


class Normalization(nn.Module):
    """``normalize`` as a module: the last step of every augmentation pipeline."""

    def forward(self, images: Tensor) -> Tensor:
        return normalize(images)


def byol_recipe(
    image_size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: tuple[float, float] = (1.0, 0.1),
    solarize_prob: tuple[float, float] = (0.0, 0.2),
) -> tuple[nn.Module, nn.Module]:
    """The two asymmetric BYOL pipelines (Grill et al. 2020, Table 6).

    Random resized crop (scale ``crop_scale``, aspect 3/4 to 4/3), horizontal flip (p=0.5),
    colour jitter (brightness, contrast, saturation, hue = ``jitter``, with ``jitter_prob``),
    grayscale, Gaussian blur (sigma 0.1 to 2, kernel about 10% of the side) and solarisation at
    0.5; the blur and solarisation probabilities differ between the two views.
    """
    return tuple(
        _pipeline(image_size, crop_scale, jitter, jitter_prob, grayscale_prob, blur, solarize)
        for blur, solarize in zip(blur_prob, solarize_prob)
    )


@attrs.define
class BYOLAugmentation:
    """Settings of ``byol_recipe``, with BYOL's published values (Grill et al. 2020, Table 6).

    Methods that use BYOL's views subclass their settings from this class, so the user sets the
    recipe the same way for each (``--set barlow_twins.blur_prob=[0.5, 0.5]``), and build the
    pipelines with ``settings.pipelines(run.image_size)``.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float] = (1.0, 0.1)
    solarize_prob: tuple[float, float] = (0.0, 0.2)

    def pipelines(self, image_size: int) -> tuple[nn.Module, nn.Module]:
        return byol_recipe(
            image_size,
            crop_scale=self.crop_scale,
            jitter=self.jitter,
            jitter_prob=self.jitter_prob,
            grayscale_prob=self.grayscale_prob,
            blur_prob=self.blur_prob,
            solarize_prob=self.solarize_prob,
        )


def _pipeline(
    image_size: int,
    crop_scale: tuple[float, float],
    jitter: tuple[float, float, float, float],
    jitter_prob: float,
    grayscale_prob: float,
    blur_prob: float,
    solarize_prob: float,
) -> nn.Module:
    steps: list[nn.Module] = [
        K.RandomResizedCrop((image_size, image_size), scale=crop_scale, cropping_mode="resample"),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(*jitter, p=jitter_prob),
        K.RandomGrayscale(p=grayscale_prob),
    ]
    if blur_prob > 0:
        kernel = blur_kernel_size(image_size)
        steps.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=blur_prob))
    if solarize_prob > 0:
        steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_prob))
    steps.append(Normalization())
    return nn.Sequential(*steps)


def simclr_recipe(
    image_size: int,
    views: int = 2,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    color_strength: float = 0.5,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.0,
) -> tuple[nn.Module, ...]:
    """``views`` identical SimCLR pipelines (Chen et al. 2020, Appendix A).

    Random resized crop (scale ``crop_scale``), horizontal flip, colour jitter of strength ``s``
    (brightness, contrast, saturation ``0.8 s``, hue ``0.2 s``) with ``jitter_prob``, grayscale
    with ``grayscale_prob``, and Gaussian blur (sigma 0.1 to 2, kernel about 10% of the side) with
    ``blur_prob``. The paper blurs ImageNet images with p=0.5 and leaves CIFAR-10 unblurred,
    with ``s`` = 0.5 there (Appendix B.9).
    """
    s = color_strength
    return tuple(
        _pipeline(
            image_size,
            crop_scale,
            (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            jitter_prob,
            grayscale_prob,
            blur_prob,
            0.0,
        )
        for _ in range(views)
    )


def crop_flip_recipe(image_size: int, crop_scale: tuple[float, float]) -> nn.Module:
    """The light augmentation of pretext tasks: random resized crop, horizontal flip, normalise."""
    return nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=crop_scale, cropping_mode="resample"),
        K.RandomHorizontalFlip(p=0.5),
        Normalization(),
    )


class MultiViewGenerator(ViewGenerator):
    """Views that are augmented copies of the batch: one per augmentation pipeline.

    The uint8 batch becomes float once; each pipeline then draws its own per-sample
    parameters. With two or more pipelines the generator provides ``two_views``.
    """

    def __init__(self, augmentations: Sequence[nn.Module]) -> None:
        super().__init__()
        if not augmentations:
            raise ValueError("MultiViewGenerator needs at least one augmentation pipeline")
        self.augmentations = nn.ModuleList(augmentations)
        self.provides = frozenset({"two_views"}) if len(augmentations) >= 2 else frozenset()

    def forward(self, batch: Tensor) -> Views:
        images = to_float(batch)
        return Views(images=tuple(aug(images) for aug in self.augmentations))
