"""Crops taken from images at their stored resolution, batched on the device.

Images of a folder or of shards keep a resolution of their own (``docs/data.md``): a batch of
them is a zero-padded canvas ``(B, C, H, W)`` and the ``extents`` ``(B, 2)``, the height and
width of each image in its top-left corner. A random resized crop then samples each box inside
its own image, as torchvision's ``RandomResizedCrop`` does for one image (Szegedy et al. 2015;
the area and aspect-ratio ranges of SimCLR, BYOL and the rest), and resamples every box to the
output size in one ``torchvision.ops.roi_align`` call: bilinear samples averaged over each output
pixel's footprint, so shrinking a large box does not alias. Portrait images lie on their side
on the canvas (``extents[:, 2]`` is 1 for them, ``sslplug.data.decode.pad_batch``): their boxes
are drawn with the inverse aspect ratio, and their crops are turned back upright.

For a batch of equal-size images (in-memory data sets such as the default data and CIFAR),
``RandomResizedCrop`` is kornia's, unchanged, so runs on those data draw the same crops as
before stored-resolution crops existed.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import Tensor, nn

__all__ = [
    "RandomResizedCrop",
    "center_boxes",
    "fit_batch",
    "resized_crops",
    "sample_boxes",
    "upright",
]

_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


def sample_boxes(
    extents: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random box per image, ``(B, 4)`` as ``(x0, y0, x1, y1)`` in pixels of the canvas.

    Each box covers a share of its image's area drawn uniformly from ``scale`` with a
    log-uniform aspect ratio (width / height of the upright image) from ``ratio``, and lies
    inside the image. Ten draws per image are tried; an image where none fits gets the largest
    centred box of an aspect ratio inside ``ratio`` (torchvision's rule). ``extents`` is
    ``(B, 2)`` heights and widths, or ``(B, 3)`` with 1 in the last column for images lying on
    their side, whose boxes are drawn transposed.
    """
    turned = _turned(extents)
    extents = extents[:, :2].to(torch.float32)
    device, n = extents.device, len(extents)
    height, width = extents[:, 0:1], extents[:, 1:2]
    area = height * width
    target = area * torch.empty(n, _ATTEMPTS, device=device).uniform_(
        *scale, generator=generator
    )
    log_ratio = torch.empty(n, _ATTEMPTS, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.where(turned.unsqueeze(1), -log_ratio, log_ratio).exp()
    box_w, box_h = (target * aspect).sqrt(), (target / aspect).sqrt()
    fits = (box_w <= width) & (box_h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # first attempt that fits (0 when none)
    box_w, box_h = box_w.gather(1, first), box_h.gather(1, first)
    found = fits.any(dim=1, keepdim=True)

    lo = torch.where(turned, 1 / ratio[1], ratio[0]).unsqueeze(1)  # the ratio range on the canvas
    hi = torch.where(turned, 1 / ratio[0], ratio[1]).unsqueeze(1)
    image_ratio = width / height
    fallback_w = torch.where(image_ratio > hi, height * hi, width)
    fallback_h = torch.where(image_ratio < lo, width / lo, height)
    box_w = torch.where(found, box_w, fallback_w)
    box_h = torch.where(found, box_h, fallback_h)
    position = torch.rand(n, 2, device=device, generator=generator)
    x0 = torch.where(found, position[:, 0:1] * (width - box_w), (width - box_w) / 2)
    y0 = torch.where(found, position[:, 1:2] * (height - box_h), (height - box_h) / 2)
    return torch.cat([x0, y0, x0 + box_w, y0 + box_h], dim=1)


def _turned(extents: Tensor) -> Tensor:
    """``(B,)`` booleans: which images lie on their side on the canvas."""
    if extents.shape[1] < 3:
        return torch.zeros(len(extents), dtype=torch.bool, device=extents.device)
    return extents[:, 2].bool()


def upright(crops: Tensor, extents: Tensor) -> Tensor:
    """The crops of images that lay on their side, turned back (``crops`` are square)."""
    turned = _turned(extents)
    if not bool(turned.any()):
        return crops
    return torch.where(turned.view(-1, 1, 1, 1), crops.transpose(-1, -2), crops)


def center_boxes(extents: Tensor) -> Tensor:
    """The centred square of side ``min(height, width)`` of each image, ``(B, 4)``."""
    extents = extents[:, :2].to(torch.float32)
    side = extents.min(dim=1, keepdim=True).values
    y0 = (extents[:, 0:1] - side) / 2
    x0 = (extents[:, 1:2] - side) / 2
    return torch.cat([x0, y0, x0 + side, y0 + side], dim=1)


def resized_crops(images: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop box ``i`` of image ``i`` and resample it to ``size``: float ``(B, C, h, w)``.

    ``images`` is float (any dtype ``roi_align`` takes on its device); the boxes are in pixel
    units with pixel ``j`` covering ``[j, j + 1)``.
    """
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes; give one box per image")
    out = (size, size) if isinstance(size, int) else size
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes], dim=1).to(images.dtype)
    from torchvision.ops import roi_align  # torchvision loads torch._dynamo: only when cropping

    return roi_align(images, rois, out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def fit_batch(images: Tensor, extents: Tensor | None, size: int) -> Tensor:
    """uint8 ``(B, C, size, size)``: each image's shorter side resized to ``size`` and the
    centre square kept, the square batch that consumers of fixed-size images read."""
    if extents is None and images.shape[-2:] == (size, size):
        return images
    if extents is None:
        extents = torch.tensor(images.shape[-2:], device=images.device).expand(len(images), 2)
    fitted = upright(resized_crops(images.float(), center_boxes(extents), size), extents)
    return fitted.round_().clamp_(0, 255).to(torch.uint8)


class RandomResizedCrop(nn.Module):
    """A random resized crop to ``size`` (square) with area share ``scale`` and aspect ratio
    ``ratio``, for a batch of equal-size images or of images of their own sizes.

    ``forward(images)`` crops equal-size images with kornia's ``RandomResizedCrop``;
    ``forward(images, extents)`` crops each image of a padded canvas inside its own extent
    (``sample_boxes`` then ``resized_crops``). The recipes of ``sslplug.augment`` start with it,
    and ``MultiViewGenerator`` hands it the extents.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__()
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.uniform = K.RandomResizedCrop(
            (size, size), scale=scale, ratio=ratio, cropping_mode="resample"
        )

    def forward(self, images: Tensor, extents: Tensor | None = None) -> Tensor:
        if extents is None:
            return self.uniform(images)
        boxes = sample_boxes(extents, self.scale, self.ratio)  # type: ignore[arg-type]
        return upright(resized_crops(images, boxes, self.size), extents)
