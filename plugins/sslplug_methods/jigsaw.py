"""Jigsaw: solve a 3x3 jigsaw puzzle of the image (Noroozi & Favaro 2016, arXiv:1603.09246).

The image is cut into a 3x3 grid; from each cell a smaller tile is cropped at a random offset,
so that gaps between tiles keep edges and lines from giving the order away, and each tile is
standardised on its own, so that its colour and brightness do not either (Section 3.2). The
nine tiles are shuffled by one permutation from a fixed set; a shared backbone encodes every
tile, the features are concatenated in the shuffled order, and a classifier names the
permutation, with cross-entropy::

    L(x) = -log p(P | tiles of x shuffled by P),    P drawn from the permutation set

The permutation set is chosen greedily from all 9! orders for large Hamming distances between
its members (Section 3.3): start from the identity, then repeatedly add the permutation whose
smallest distance to the chosen ones is largest, the first such in lexicographic order. The set
depends only on its size, 100 by default (the paper's best was 1000, at a harder task).

Small images: a 32x32 image gives 10-pixel cells and 8-pixel tiles (the paper: 75-pixel cells,
64-pixel tiles), which every backbone here accepts; ``upsample_to`` resizes images first for a
larger puzzle at a higher cost.

Evaluation (``features``) cuts the whole image into the same 3x3 grid of standardised tiles,
unshuffled and centred in their cells, and concatenates the nine tile features: the input the
backbone was trained on. The backbone applied to whole images instead, as the paper transfers its
convolutional layers for fine-tuning, scored below the random encoder in a frozen kNN on the
default data (docs/benchmarks.md has the figures): a network trained on 8-pixel standardised
tiles does not see a 32-pixel image the same way without fine-tuning.

Usage::

    sslplug run --plugin jigsaw --set jigsaw.num_permutations=1000
"""

from __future__ import annotations

import functools
import itertools

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, Views

GRID = 3
TILES = GRID * GRID


def _permutation_count(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if not 2 <= value <= 1000:
        raise sslplug.ConfigError(
            f"{attribute.name} must be between 2 and 1000 permutations, got {value!r}"
        )


@attrs.define
class JigsawSettings:
    """The jigsaw recipe (Noroozi & Favaro 2016, Sections 3.2-3.3), scaled for small images.

    Tiles are ``tile_fraction`` of a cell (64/75 in the paper). The light augmentation before
    tiling: random resized crop with scale ``crop_scale`` and a horizontal flip.
    """

    num_permutations: int = attrs.field(default=100, validator=_permutation_count)
    tile_fraction: float = 0.8
    upsample_to: int = 0
    crop_scale: tuple[float, float] = (0.6, 1.0)
    classifier_hidden_dim: int = 1024


@functools.lru_cache(maxsize=8)
def permutation_set(size: int) -> Tensor:
    """``size`` permutations of 9 tiles, ``(size, 9)`` int64, spread far apart in Hamming distance.

    Greedy max-min selection over all 9! permutations in lexicographic order, starting with the
    identity; ties go to the first. Deterministic: the same size gives the same set.
    """
    flat = itertools.chain.from_iterable(itertools.permutations(range(TILES)))
    every = np.fromiter(flat, dtype=np.int8).reshape(-1, TILES)
    chosen = [0]
    nearest = (every != every[0]).sum(1)
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        np.minimum(nearest, (every != every[index]).sum(1), out=nearest)
    return torch.from_numpy(every[chosen]).long()


def cut_tiles(images: Tensor, tile: int, jitter: bool) -> Tensor:
    """The 3x3 grid of ``tile``-pixel tiles of each image, ``(B, 9, C, tile, tile)``, row-major.

    Each cell is ``side // 3`` pixels; the tile sits at a random offset within its cell, drawn
    per tile, or, without ``jitter``, in the cell's centre.
    """
    b, c, h, _ = images.shape
    cell = h // GRID
    slack = cell - tile
    if jitter:
        offsets = torch.randint(0, slack + 1, (b, TILES, 2), device=images.device)
    else:
        offsets = torch.full((b, TILES, 2), slack // 2, device=images.device)
    rows = torch.arange(TILES, device=images.device) // GRID
    cols = torch.arange(TILES, device=images.device) % GRID
    top = rows * cell + offsets[..., 0]  # (B, 9)
    left = cols * cell + offsets[..., 1]
    span = torch.arange(tile, device=images.device)
    ys = (top[..., None] + span)[..., :, None].expand(b, TILES, tile, tile)
    xs = (left[..., None] + span)[..., None, :].expand(b, TILES, tile, tile)
    flat = images.flatten(2)  # (B, C, H*W)
    index = (ys * images.shape[-1] + xs).reshape(b, 1, -1).expand(b, c, -1)
    tiles = flat.gather(2, index).view(b, c, TILES, tile, tile)
    return tiles.permute(0, 2, 1, 3, 4)


def tile_size(side: int, tile_fraction: float) -> int:
    """The side of a tile: ``tile_fraction`` of a cell of the 3x3 grid."""
    return max(1, int(tile_fraction * (side // GRID)))


def shuffle_tiles(tiles: Tensor, order: Tensor) -> Tensor:
    """``tiles`` ``(B, 9, ...)`` rearranged so that position ``p`` shows cell ``order[b, p]``."""
    index = order.view(*order.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, index)


def standardise_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile's channels to zero mean and unit variance over its own pixels."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True)
    return (tiles - mean) / (std + eps)


class JigsawViews(sslplug.ViewGenerator):
    """One view of ``9B`` shuffled tiles, image-major; targets ``"permutation"``: ``(B,)`` ids.

    Tile ``p`` of image ``i`` is cell ``permutations[label_i][p]`` of the unshuffled grid, so
    putting tile ``p`` back at that cell restores the image.
    """

    requires = frozenset({"normalized_views"})
    provides = frozenset({"permutation_labels"})
    permutations: Tensor  # a buffer

    def __init__(
        self, augmentation: nn.Module, permutations: Tensor, tile_fraction: float, upsample_to: int
    ) -> None:
        super().__init__()
        self.augmentation = augmentation
        self.register_buffer("permutations", permutations, persistent=False)
        self.tile_fraction = tile_fraction
        self.upsample_to = upsample_to

    def forward(self, batch: Tensor) -> Views:
        images = sslplug.to_float(batch)
        if self.upsample_to:
            images = F.interpolate(images, size=self.upsample_to, mode="bilinear", antialias=True)
        images = self.augmentation(images)
        tiles = cut_tiles(images, tile_size(images.shape[-1], self.tile_fraction), jitter=True)
        labels = torch.randint(0, len(self.permutations), (batch.shape[0],), device=batch.device)
        shuffled = standardise_tiles(shuffle_tiles(tiles, self.permutations[labels]))
        return Views(images=(shuffled.flatten(0, 1),), targets={"permutation": labels})


class JigsawEncoder(Encoder):
    """Shared tile backbone; tile features concatenated in the shuffled order; a classifier.

    ``features(images)`` is the concatenation of the nine tile features of the unshuffled grid,
    so ``feature_dim`` is nine times the backbone's width.
    """

    provides = frozenset({"logits"})

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: JigsawSettings) -> None:
        super().__init__(backbone, TILES * feature_dim)
        self.classifier = MLP(
            TILES * feature_dim, [settings.classifier_hidden_dim], settings.num_permutations
        )
        self.tile_fraction, self.upsample_to = settings.tile_fraction, settings.upsample_to

    def forward(self, views: Views) -> Outputs:
        features = self.backbone(views.images[0])  # (9B, D)
        logits = self.classifier(features.view(-1, TILES * features.shape[1]))
        return Outputs(features=(features,), logits=logits)

    def features(self, images: Tensor) -> Tensor:
        if self.upsample_to:
            images = F.interpolate(images, size=self.upsample_to, mode="bilinear", antialias=True)
        tile = tile_size(images.shape[-1], self.tile_fraction)
        tiles = standardise_tiles(cut_tiles(images, tile, jitter=False))
        return self.backbone(tiles.flatten(0, 1)).view(images.shape[0], -1)


@sslplug.hookimpl
def sslplug_settings() -> type:
    return JigsawSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: JigsawSettings, run: RunContext) -> sslplug.Augmentations:
    size = settings.upsample_to or run.image_size
    return sslplug.Augmentations([sslplug.crop_flip_recipe(size, settings.crop_scale)])


@sslplug.hookimpl
def sslplug_views(
    settings: JigsawSettings, augmentations: tuple[nn.Module, ...]
) -> sslplug.ViewGenerator:
    return JigsawViews(
        augmentations[0],
        permutation_set(settings.num_permutations),
        settings.tile_fraction,
        settings.upsample_to,
    )


@sslplug.hookimpl
def sslplug_encoder(settings: JigsawSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return JigsawEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_loss() -> nn.Module:
    return sslplug.PretextCrossEntropy("permutation", "permutation_labels")
