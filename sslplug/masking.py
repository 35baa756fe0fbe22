"""Masks over a ViT's patch grid, drawn batched on the device by a view generator.

A mask travels in ``Views.targets`` as patch indices, row-major over the grid that the
backbone gives for ``Views.images[0]`` (``ViTBackbone.grid``), so the encoder can drop the
patches it must not see before its blocks (``ViTBackbone.tokens(images, keep)``) and any other
method that reads the same capability can reuse them:

- ``patch_mask`` (MAE, He et al. 2022): ``targets["keep"]`` ``(B, K)`` the visible patches and
  ``targets["masked"]`` ``(B, N - K)`` the hidden ones, drawn by ``random_patch_mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_patch_mask"]


def random_patch_mask(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Hide ``round(mask_ratio * num_patches)`` patches of every image, chosen uniformly at
    random and independently per image (MAE's random sampling, He et al. 2022, Section 3).

    Returns ``(keep, masked)``: ``(B, K)`` and ``(B, N - K)`` int64 patch indices, each row
    sorted, disjoint, together every patch. One ``argsort`` of uniform noise for the whole
    batch, as MAE's official code shuffles.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio {mask_ratio} must be in [0, 1): some patch must be seen")
    hidden = round(mask_ratio * num_patches)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    order = noise.argsort(dim=1)
    keep = order[:, : num_patches - hidden].sort(dim=1).values
    masked = order[:, num_patches - hidden :].sort(dim=1).values
    return keep, masked
