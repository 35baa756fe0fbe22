"""``shapes``, the embedded default data set.

Ten classes of geometric shapes drawn procedurally, with positions, sizes and orientations that
vary at random and carry no information about the class. No download; the same images on every
machine.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from sslplug.config import DataSettings
from sslplug.data.split import DataSet, Split

__all__ = ["SHAPE_CLASSES", "load_shapes", "make_shapes"]

SHAPE_CLASSES = (
    "disk", "ring", "square", "frame", "triangle",
    "plus", "half_disk", "two_dots", "stripes", "bar",
)  # fmt: skip


def _shape_masks(label: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Boolean masks ``(N, H, W)``: shape ``label[i]`` in the rotated, scaled frame ``(x, y)``."""
    r = torch.sqrt(x**2 + y**2)
    box = torch.maximum(x.abs(), y.abs())
    masks = torch.stack(
        [
            r < 1.0,
            (r > 0.55) & (r < 1.0),
            box < 0.8,
            (box > 0.45) & (box < 0.85),
            (y > -0.5) & (math.sqrt(3.0) * x.abs() + y < 1.0),
            ((x.abs() < 0.3) & (y.abs() < 0.95)) | ((y.abs() < 0.3) & (x.abs() < 0.95)),
            (r < 1.0) & (y > 0.0),
            ((x - 0.55) ** 2 + y**2 < 0.16) | ((x + 0.55) ** 2 + y**2 < 0.16),
            (r < 1.0) & (torch.cos(x * 2.5 * math.pi) > 0.0),
            (x.abs() < 1.0) & (y.abs() < 0.3),
        ],
        dim=1,
    )
    return masks[torch.arange(len(label)), label]


def make_shapes(per_class: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """Draw ``per_class`` images of each of the ten shape classes: ``(uint8 images, labels)``.

    A light shape on a dark ground; position, size, a small rotation and pixel noise are random
    and independent of the class, so the class is in the shape alone. Brightness and colour are
    the same in every image on purpose: when they varied from image to image (random colours,
    random grey levels with a tint, or a textured background), the two views of an image shared
    that cue, BYOL learned it instead of the shape, and kNN accuracy fell below the random
    encoder's (docs/design.md has the figures).
    """
    g = torch.Generator().manual_seed(seed)
    n = per_class * len(SHAPE_CLASSES)
    label = torch.arange(len(SHAPE_CLASSES)).repeat_interleave(per_class)
    label = label[torch.randperm(n, generator=g)]

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    grid = torch.linspace(-1.0, 1.0, size)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy = uniform(-0.2, 0.2, n, 1, 1), uniform(-0.2, 0.2, n, 1, 1)
    scale = uniform(0.6, 0.85, n, 1, 1)
    angle = uniform(-0.3, 0.3, n, 1, 1)
    du, dv = u - cx, v - cy
    x = (du * torch.cos(angle) + dv * torch.sin(angle)) / scale
    y = (-du * torch.sin(angle) + dv * torch.cos(angle)) / scale
    mask = _shape_masks(label, x, y).unsqueeze(1).float()

    background, foreground = 0.15, 0.85
    image = background * (1 - mask) + foreground * mask
    image = image + 0.06 * torch.randn(n, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), label


@functools.cache
def _drawn() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The images and labels of both splits, drawn once per process (they take a second and
    never differ); ``load_shapes`` hands out copies."""
    train, train_labels = make_shapes(per_class=500, seed=0)
    test, test_labels = make_shapes(per_class=100, seed=1)
    return train, train_labels, test, test_labels


def load_shapes(settings: DataSettings, seed: int) -> DataSet:
    """The ``shapes`` data set: 500 images of each class to train on, 100 to test on (the
    same whatever the settings and the seed)."""
    train, train_labels, test, test_labels = (t.clone() for t in _drawn())
    return DataSet(
        name="shapes",
        train=Split(images=train, labels=train_labels),
        test=Split(images=test, labels=test_labels),
        image_size=32,
        classes=SHAPE_CLASSES,
    )
