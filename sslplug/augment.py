"""Augmentation recipes as kornia modules, batched on the device, and the generic view generator.

Every recipe maps a float batch ``(B, C, H, W)`` in ``[0, 1]`` to an augmented, normalised batch,
drawing its random parameters per sample. Methods share these recipes, so a third-party plugin
gets the same BYOL pipeline as the built-in one by calling ``byol_recipe``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import attrs
import kornia.augmentation as K
import torch
from torch import Tensor, nn

from sslplug.components import Augmentations, ViewGenerator, Views
from sslplug.data.crops import RandomResizedCrop

__all__ = [
    "MEAN",
    "STD",
    "BYOLAugmentation",
    "ColorJitter",
    "MultiViewGenerator",
    "Normalization",
    "RandomResizedCrop",
    "blur_kernel_size",
    "blur_on",
    "byol_recipe",
    "crop_flip_recipe",
    "denormalize",
    "multicrop_recipe",
    "normalize",
    "rotate_hue",
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


def blur_on(setting: str, image_size: int) -> bool:
    """Whether a recipe with the setting ``blur = "auto" | "on" | "off"`` blurs its views.

    ``"auto"`` blurs images above 64 px only: SimCLR blurs ImageNet and leaves CIFAR-10
    unblurred (Chen et al. 2020, Appendix B.9), where the kernel would be 3 px. Methods whose
    settings have that field (SimCLR, SimSiam, MoCo v2, SwAV) share this rule.
    """
    return setting == "on" or (setting == "auto" and image_size > 64)


class ColorJitter(nn.Module):
    """torchvision's ``ColorJitter`` for a batch: per-sample factors, applied with probability
    ``p`` per sample, on the device.

    Brightness, contrast and saturation factors are drawn uniformly from ``[max(0, 1 - x),
    1 + x]`` and the hue shift from ``[-hue, hue]``, as torchvision does, and each operation is
    torchvision's (contrast blends with the mean grey level of the image, saturation with its
    grey version, hue rotates the HSV hue). The four are applied in a random order drawn once
    per batch, as kornia's ``ColorJitter`` does (torchvision draws one per image).

    It replaces kornia's ``ColorJitter``, which converts to HSV for saturation and again for hue
    and took about two thirds of the BYOL recipe's time on a CPU; the hue rotation here needs
    one pass (see ``rotate_hue``). The factors drawn last are kept in ``_params`` under kornia's
    names, so tests read them the same way for every augmentation.
    """

    def __init__(
        self,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue {hue} must be in [0, 0.5]")
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness,
            contrast,
            saturation,
            hue,
        )
        self.ranges = {
            "brightness_factor": (max(0.0, 1 - brightness), 1 + brightness),
            "contrast_factor": (max(0.0, 1 - contrast), 1 + contrast),
            "saturation_factor": (max(0.0, 1 - saturation), 1 + saturation),
            "hue_factor": (-hue, hue),
        }
        self.p = p
        self._params: dict[str, Tensor] = {}

    def forward(self, images: Tensor) -> Tensor:
        b, device = images.shape[0], images.device
        apply = torch.rand(b, device=device) < self.p
        identity = {"brightness_factor": 1.0, "contrast_factor": 1.0, "saturation_factor": 1.0}
        factors = {}
        for name, (lo, hi) in self.ranges.items():
            drawn = torch.empty(b, device=device).uniform_(lo, hi)
            factors[name] = torch.where(apply, drawn, identity.get(name, 0.0))
        order = torch.randperm(4)
        self._params = {**factors, "order": order, "batch_prob": apply}
        out = images
        for op in order.tolist():
            out = self._operation(op, out, factors)
        return out

    def _operation(self, op: int, images: Tensor, factors: dict[str, Tensor]) -> Tensor:
        if op == 0:
            if self.ranges["brightness_factor"] == (1.0, 1.0):
                return images
            return (images * factors["brightness_factor"].view(-1, 1, 1, 1)).clamp(0, 1)
        if op == 1:
            if self.ranges["contrast_factor"] == (1.0, 1.0):
                return images
            mean = _grey(images).mean(dim=(-2, -1), keepdim=True)
            return _blend(images, mean, factors["contrast_factor"])
        if op == 2:
            if self.ranges["saturation_factor"] == (1.0, 1.0):
                return images
            return _blend(images, _grey(images), factors["saturation_factor"])
        if self.ranges["hue_factor"] == (0.0, 0.0):
            return images
        return rotate_hue(images, factors["hue_factor"])


def _grey(images: Tensor) -> Tensor:
    """ITU-R 601 luma, as torchvision's ``rgb_to_grayscale``: ``(B, 1, H, W)``."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp(0, 1)


def rotate_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Shift the HSV hue of RGB images in ``[0, 1]`` by ``shift`` (per sample, in turns).

    Equal to converting to HSV, adding ``shift`` to the hue modulo 1 and converting back, in one
    pass: with ``V`` the largest channel, ``C`` the chroma (largest minus smallest) and ``H`` the
    hue in sixths of a turn, channel ``n`` (5 for red, 3 for green, 1 for blue) is
    ``V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + H) mod 6``.
    """
    r, g, b = images.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)  # elementwise: much faster than max(dim)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        maxc == r,
        (g - b) / safe,
        torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = hue + 6.0 * shift.view(-1, 1, 1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue + n, 6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=-3)


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
) -> Augmentations:
    """The two asymmetric BYOL pipelines (Grill et al. 2020, Table 6).

    Random resized crop (scale ``crop_scale``, aspect 3/4 to 4/3), horizontal flip (p=0.5),
    colour jitter (brightness, contrast, saturation, hue = ``jitter``, with ``jitter_prob``),
    grayscale, Gaussian blur (sigma 0.1 to 2, kernel about 10% of the side) and solarisation at
    0.5; the blur and solarisation probabilities differ between the two views.
    """
    return Augmentations(
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

    def pipelines(self, image_size: int) -> Augmentations:
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
        RandomResizedCrop(image_size, scale=crop_scale),
        K.RandomHorizontalFlip(p=0.5),
        ColorJitter(*jitter, p=jitter_prob),
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
) -> Augmentations:
    """``views`` identical SimCLR pipelines (Chen et al. 2020, Appendix A).

    Random resized crop (scale ``crop_scale``), horizontal flip, colour jitter of strength ``s``
    (brightness, contrast, saturation ``0.8 s``, hue ``0.2 s``) with ``jitter_prob``, grayscale
    with ``grayscale_prob``, and Gaussian blur (sigma 0.1 to 2, kernel about 10% of the side) with
    ``blur_prob``. The paper blurs ImageNet images with p=0.5 and leaves CIFAR-10 unblurred,
    with ``s`` = 0.5 there (Appendix B.9).
    """
    s = color_strength
    return Augmentations(
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


def multicrop_recipe(
    image_size: int,
    local_crops: int = 6,
    local_size: int = 0,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5),
    solarize_prob: tuple[float, float, float] = (0.0, 0.2, 0.0),
) -> Augmentations:
    """Multi-crop (Caron et al. 2020, Section 3.2): two global crops of ``image_size`` and
    ``local_crops`` small crops of ``local_size`` (0: 3/7 of the side, 96 of 224 px as in the
    papers), each pipeline otherwise as ``byol_recipe``'s.

    ``blur_prob`` and ``solarize_prob`` give the probabilities for the first global crop, the
    second global crop and every local crop, in that order (DINO's defaults; SwAV uses the same
    value for all). The result names its groups, ``("global", "global", "local", ...)``, which
    ``MultiViewGenerator`` takes up.
    """
    if local_crops < 0:
        raise ValueError(f"local_crops must be 0 or more, got {local_crops!r}")
    small = local_size or max(1, round(image_size * 3 / 7))
    sizes = [image_size, image_size] + [small] * local_crops
    scales = [global_scale, global_scale] + [local_scale] * local_crops
    which = [0, 1] + [2] * local_crops
    return Augmentations(
        (
            _pipeline(size, scale, jitter, jitter_prob, grayscale_prob, blur_prob[i],
                      solarize_prob[i])
            for size, scale, i in zip(sizes, scales, which)
        ),
        groups=("global", "global") + ("local",) * local_crops,
    )


def crop_flip_recipe(image_size: int, crop_scale: tuple[float, float]) -> nn.Module:
    """The light augmentation of pretext tasks: random resized crop, horizontal flip, normalise."""
    return nn.Sequential(
        RandomResizedCrop(image_size, scale=crop_scale),
        K.RandomHorizontalFlip(p=0.5),
        Normalization(),
    )


class MultiViewGenerator(ViewGenerator):
    """Views that are augmented copies of the batch: one per augmentation pipeline.

    The uint8 batch becomes float once; each pipeline then draws its own per-sample
    parameters. With two or more pipelines the generator provides ``two_views``. ``groups``
    names the group of each view (multi-crop: ``("global", "global", "local", ...)``, with
    pipelines that crop to different sizes); then it also provides ``view_groups``. Without
    ``groups``, those of ``augmentations`` are taken when it is an ``Augmentations`` that names
    them (``multicrop_recipe``).

    Images of their own sizes (folders, prepared data, shards) arrive as a padded canvas with
    their ``extents``; every pipeline that starts with ``sslplug.RandomResizedCrop`` crops each
    image inside its own extent (``full_resolution``). A pipeline that starts otherwise gets
    the square batch the loader gives to every other view generator.

    A subclass may declare ``requires`` and ``provides`` on the class; an instance provides
    the class's capabilities and those of its pipelines (``two_views``, ``view_groups``).
    """

    requires = frozenset({"normalized_views"})

    def __init__(self, augmentations: Sequence[nn.Module], groups: Sequence[str] = ()) -> None:
        super().__init__()
        if not augmentations:
            raise ValueError("MultiViewGenerator needs at least one augmentation pipeline")
        if groups and len(groups) != len(augmentations):
            raise ValueError(
                f"MultiViewGenerator got {len(augmentations)} pipelines but {len(groups)} "
                f"group names; give one group per pipeline"
            )
        self.augmentations = nn.ModuleList(augmentations)
        self.groups = tuple(groups) or tuple(getattr(augmentations, "groups", ()))
        # what a subclass declares on the class is kept, with what these pipelines give
        provides = set(type(self).provides)
        provides |= {"two_views"} if len(augmentations) >= 2 else set()
        self.provides = frozenset(provides | ({"view_groups"} if self.groups else set()))

    @property
    def full_resolution(self) -> bool:  # type: ignore[override]
        """Whether ``forward`` takes images at their stored resolution with their extents:
        every pipeline starts with ``RandomResizedCrop`` and ``forward`` (this class's, or a
        subclass's) has an ``extents`` parameter."""
        takes_extents = "extents" in inspect.signature(type(self).forward).parameters
        return takes_extents and all(_starts_with_crop(aug) for aug in self.augmentations)

    def forward(self, batch: Tensor, extents: Tensor | None = None) -> Views:
        # a padded canvas is large: convert it in one pass (to_float takes two, and is kept for
        # equal-size batches so that their views stay bit for bit what they were)
        images = to_float(batch) if extents is None else batch.mul(1.0 / 255.0)
        return Views(
            images=tuple(_augment(aug, images, extents) for aug in self.augmentations),
            groups=self.groups,
        )


def _starts_with_crop(pipeline: nn.Module) -> bool:
    return isinstance(pipeline, nn.Sequential) and isinstance(pipeline[0], RandomResizedCrop)


def _augment(pipeline: nn.Module, images: Tensor, extents: Tensor | None) -> Tensor:
    """``pipeline(images)``, its leading crop given the extents of images of their own sizes."""
    if extents is None:
        return pipeline(images)
    assert isinstance(pipeline, nn.Sequential)  # full_resolution checked that it starts so
    images = pipeline[0](images, extents)
    for step in pipeline[1:]:
        images = step(images)
    return images
