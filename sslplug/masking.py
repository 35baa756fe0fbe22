"""Masks over a ViT's patch grid, drawn batched on the device by a view generator.

A mask travels in ``Views.targets`` as patch indices, row-major over the grid that the
backbone gives for ``Views.images[0]`` (``ViTBackbone.grid``), so the encoder can drop the
patches it must not see before its blocks (``ViTBackbone.tokens(images, keep)``) and any other
method that reads the same capability can reuse them:

- ``patch_mask`` (MAE, He et al. 2022): ``targets["keep"]`` ``(B, K)`` the visible patches and
  ``targets["masked"]`` ``(B, N - K)`` the hidden ones, drawn by ``random_patch_mask``.
- ``block_masks`` (I-JEPA, Assran et al. 2023): ``targets["context"]`` ``(B, K)`` the patches
  the context encoder sees and ``targets["target_blocks"]`` ``(B, M, T)`` the patches of ``M``
  rectangular target blocks whose representations are predicted, drawn by
  ``sample_block_masks``. The context is one large block with every target patch removed.
  The built-in ``ijepa`` plugin registers this capability.

Masks that replace patches by a learned mask token instead of dropping them (BEiT, iBOT,
DINOv2) are boolean ``(B, N)``, row-major over the same grid, as
``ViTBackbone.tokens(images, mask=...)`` takes them: drawn by ``sample_blockwise_masks``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_size", "random_patch_mask", "sample_block_masks", "sample_blockwise_masks"]


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


def block_size(grid: tuple[int, int], scale: float, aspect_ratio: float) -> tuple[int, int]:
    """Rows and columns of a block covering about ``scale`` of the grid, ``aspect_ratio`` being
    its height over its width.

    As I-JEPA's official collator (``src/masks/multiblock.py``): the area is
    ``floor(scale * H * W)`` patches, and each side is the exact side rounded to whole patches,
    so each is within half a patch of ``sqrt(area * aspect_ratio)`` and
    ``sqrt(area / aspect_ratio)``; then kept between 1 and the grid's side.
    """
    rows, cols = grid
    area = math.floor(scale * rows * cols)
    height = round(math.sqrt(area * aspect_ratio))
    width = round(math.sqrt(area / aspect_ratio))
    return min(max(height, 1), rows), min(max(width, 1), cols)


def _block_masks(
    grid: tuple[int, int], size: tuple[int, int] | tuple[Tensor, Tensor], top: Tensor, left: Tensor
) -> Tensor:
    """Boolean masks ``(*top.shape, H * W)`` of the ``size`` blocks at ``(top, left)``; the
    size is one for all blocks, or a height and a width per block, shaped as ``top``."""
    rows, cols = grid
    row = torch.arange(rows, device=top.device)
    col = torch.arange(cols, device=top.device)
    in_rows = (row >= top.unsqueeze(-1)) & (row < (top + size[0]).unsqueeze(-1))
    in_cols = (col >= left.unsqueeze(-1)) & (col < (left + size[1]).unsqueeze(-1))
    return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).flatten(-2)


def _corners(
    shape: tuple[int, ...],
    grid: tuple[int, int],
    size: tuple[int, int],
    device: torch.device | str,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Top rows and left columns ``shape`` of ``size`` blocks placed uniformly inside the grid."""
    spans = torch.tensor(
        [grid[0] - size[0] + 1, grid[1] - size[1] + 1], device=device, dtype=torch.float32
    )
    corner = (torch.rand(*shape, 2, device=device, generator=generator) * spans).long()
    corner = torch.minimum(corner, spans.long() - 1)  # rand may round up to 1.0 in float32
    return corner[..., 0], corner[..., 1]


def _check_block_mask_ranges(
    grid: tuple[int, int],
    num_targets: int,
    target_scale: tuple[float, float],
    target_aspect_ratio: tuple[float, float],
    context_scale: tuple[float, float],
    min_keep: int,
    tries: int,
) -> None:
    """Raise ``ValueError`` for settings of ``sample_block_masks`` that cannot be drawn, among
    them a smallest context block too small to keep ``min_keep`` patches."""
    for name, (low, high) in (("target_scale", target_scale), ("context_scale", context_scale)):
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"{name} must be a range with 0 < low <= high <= 1, got {(low, high)}")
    low, high = target_aspect_ratio
    if not 0.0 < low <= high:
        raise ValueError(
            f"target_aspect_ratio must be a range with 0 < low <= high, got {(low, high)}"
        )
    if num_targets < 0 or tries < 1 or min_keep < 1:
        raise ValueError(
            f"num_targets must be 0 or more, tries and min_keep 1 or more; got {num_targets}, "
            f"{tries}, {min_keep}"
        )
    smallest = block_size(grid, context_scale[0], 1.0)
    if smallest[0] * smallest[1] < min_keep:
        raise ValueError(
            f"a context block of scale {context_scale[0]} on a {grid[0]}x{grid[1]} patch grid "
            f"holds {smallest[0] * smallest[1]} patches, fewer than min_keep={min_keep}; "
            f"lower min_keep, or use smaller patches"
        )


def _draw_block_sizes(
    grid: tuple[int, int],
    target_scale: tuple[float, float],
    target_aspect_ratio: tuple[float, float],
    context_scale: tuple[float, float],
    device: torch.device | str,
    generator: torch.Generator | None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The sizes of the target blocks and of the context block, drawn once for the batch from
    three uniform numbers: the targets' scale and aspect ratio, and the context's scale."""
    u = torch.rand(3, device=device, generator=generator).tolist()
    scale = target_scale[0] + u[0] * (target_scale[1] - target_scale[0])
    aspect = target_aspect_ratio[0] + u[1] * (target_aspect_ratio[1] - target_aspect_ratio[0])
    target_size = block_size(grid, scale, aspect)
    context_size = block_size(
        grid, context_scale[0] + u[2] * (context_scale[1] - context_scale[0]), 1.0
    )
    return target_size, context_size


def _block_indices(
    grid: tuple[int, int], size: tuple[int, int], top: Tensor, left: Tensor
) -> Tensor:
    """Row-major patch indices ``(*top.shape, size[0] * size[1])`` of the ``size`` blocks at
    ``(top, left)``, each row sorted."""
    rows = top.unsqueeze(-1) + torch.arange(size[0], device=top.device)
    cols = left.unsqueeze(-1) + torch.arange(size[1], device=top.device)
    return (rows.unsqueeze(-1) * grid[1] + cols.unsqueeze(-2)).flatten(-2)


def _covered_by_targets(
    grid: tuple[int, int], size: tuple[int, int], top: Tensor, left: Tensor
) -> Tensor:
    """``covered[:, k]``, the patches of the first ``k`` target blocks, ``k = 0..M``:
    ``(B, M + 1, N)`` booleans."""
    covered = _block_masks(grid, size, top, left).cumsum(dim=1) > 0
    none = torch.zeros(top.shape[0], 1, grid[0] * grid[1], dtype=torch.bool, device=top.device)
    return torch.cat([none, covered], dim=1)


def _choose_context(candidates: Tensor, covered: Tensor, min_keep: int) -> Tensor:
    """The context patch indices ``(B, K)`` from the ``candidates`` ``(B, tries, N)`` context
    blocks: every target removed where some candidate still keeps ``min_keep`` patches, else
    the targets let back in from the last one; the first such candidate; cut to the shortest
    context of the batch, keeping its first patches in row-major order."""
    num_targets = covered.shape[1] - 1
    # context of candidate r with the first k targets removed: (B, tries, M + 1, N)
    allowed = candidates.unsqueeze(2) & ~covered.unsqueeze(1)
    enough = allowed.sum(dim=-1) >= min_keep
    # the most targets removed that some candidate allows, then the first such candidate
    removed = num_targets - enough.any(dim=1).flip(-1).int().argmax(dim=-1)
    image = torch.arange(candidates.shape[0], device=candidates.device)
    chosen = enough[image, :, removed].int().argmax(dim=-1)
    context_mask = allowed[image, chosen, removed]
    keep = int(context_mask.sum(dim=-1).min())
    # patches of the context first, each group in row-major order
    order = torch.sort((~context_mask).to(torch.uint8), dim=-1, stable=True).indices
    return order[:, :keep]


def sample_block_masks(
    batch: int,
    grid: tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 10,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    tries: int = 20,
) -> tuple[Tensor, Tensor]:
    """I-JEPA's multi-block masks (Assran et al. 2023, Section 3 and Figure 4), for a batch, on
    ``device``.

    ``num_targets`` target blocks of scale ``target_scale`` and aspect ratio (height over
    width) ``target_aspect_ratio``, possibly overlapping, and one context block of scale
    ``context_scale`` and aspect ratio 1 from which every target patch is removed, so the
    context never shows what is to be predicted. As in the official collator
    (``src/masks/multiblock.py``), the sizes of the blocks (``block_size``) are drawn once for
    the batch and their positions for every image, uniformly inside the grid; the context lists
    are then cut to the shortest in the batch, keeping the first patches in row-major order, so
    that they stack.

    A context must keep at least ``min_keep`` patches. Each image gets ``tries`` candidate
    positions of its context block, and takes the first that keeps enough; where none does, the
    targets are let into the context from the last one back until one does, as the official
    collator relaxes its constraint after every 20 failed draws.

    Returns ``(context, targets)``: ``(B, K)`` and ``(B, M, T)`` int64 patch indices, row-major
    over ``grid`` (``ViTBackbone.grid``), each row sorted; ``T`` is the area of the target
    blocks. Everything is drawn from ``generator`` (the device's global generator when
    ``None``), in tensors over the whole batch.

    Where this differs from the official collator: scale and aspect ratio are drawn
    independently (the collator uses one uniform number for both, so larger target blocks were
    always taller); a block may span the whole side of the grid and touch its last row and
    column (the collator keeps every side shorter than the grid's and its corner off the last
    free row and column); the ``tries`` candidates are drawn at once and reused at every
    relaxation.
    """
    _check_block_mask_ranges(
        grid, num_targets, target_scale, target_aspect_ratio, context_scale, min_keep, tries
    )
    target_size, context_size = _draw_block_sizes(
        grid, target_scale, target_aspect_ratio, context_scale, device, generator
    )
    top, left = _corners((batch, num_targets), grid, target_size, device, generator)
    targets = _block_indices(grid, target_size, top, left)
    covered = _covered_by_targets(grid, target_size, top, left)
    top, left = _corners((batch, tries), grid, context_size, device, generator)
    candidates = _block_masks(grid, context_size, top, left)  # (B, tries, N)
    return _choose_context(candidates, covered, min_keep), targets


def _check_blockwise_ranges(
    mask_ratio: tuple[float, float],
    mask_probability: float,
    min_block_patches: int,
    aspect_ratio: tuple[float, float],
    attempts: int,
    max_blocks: int,
) -> None:
    """Raise ``ValueError`` for settings of ``sample_blockwise_masks`` that cannot be drawn."""
    low, high = mask_ratio
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            f"mask_ratio must be a range with 0 <= low <= high <= 1, got {(low, high)}"
        )
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability {mask_probability} must be in [0, 1]")
    low, high = aspect_ratio
    if not 0.0 < low <= high:
        raise ValueError(f"aspect_ratio must be a range with 0 < low <= high, got {(low, high)}")
    if min_block_patches < 1 or attempts < 1 or max_blocks < 1:
        raise ValueError(
            f"min_block_patches, attempts and max_blocks must be 1 or more; got "
            f"{min_block_patches}, {attempts}, {max_blocks}"
        )


def _masked_counts(
    batch: int,
    num_patches: int,
    mask_ratio: tuple[float, float],
    mask_probability: float,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> Tensor:
    """How many patches each image of the batch should hide, ``(B,)`` int64: ``int(batch *
    mask_probability)`` images, in random places, get ``floor(ratio * num_patches)`` with one
    ratio per image drawn in ``mask_ratio`` stratified (the range cut into as many equal parts
    as there are such images, one ratio uniform in each, as DINOv2's collate does); the others
    get 0."""
    masked = int(batch * mask_probability)
    low, high = mask_ratio
    stratum = torch.arange(masked, device=device) + torch.rand(
        masked, device=device, generator=generator
    )
    ratio = low + stratum / max(masked, 1) * (high - low)
    # float32 may round a ratio onto the range's ends: keep the counts of the range itself
    fewest, most = math.floor(low * num_patches), math.floor(high * num_patches)
    counts = (ratio * num_patches).long().clamp(fewest, most)
    unmasked = torch.zeros(batch - masked, dtype=torch.long, device=device)
    order = torch.randperm(batch, device=device, generator=generator)
    return torch.cat([counts, unmasked])[order]


def _draw_blocks(
    shape: tuple[int, ...],
    grid: tuple[int, int],
    remaining: Tensor,
    min_block_patches: int,
    aspect_ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Heights, widths, top rows and left columns ``shape`` (``(B, attempts)``) of candidate
    blocks, as the BEiT masking generator draws one: an area uniform between
    ``min_block_patches`` and the image's ``remaining`` count (either may be the larger), an
    aspect ratio (height over width) log-uniform in ``aspect_ratio``, each side rounded to whole
    patches, and a corner uniform among those that keep the block inside the grid. A block as
    high or as wide as the grid gets no valid corner; the caller refuses it."""
    rows, cols = grid
    u = torch.rand(*shape, 4, device=remaining.device, generator=generator)
    high = remaining.unsqueeze(-1).float()
    area = min_block_patches + u[..., 0] * (high - min_block_patches)
    low_log, high_log = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    aspect = torch.exp(low_log + u[..., 1] * (high_log - low_log))
    height = torch.round(torch.sqrt(area * aspect)).long()
    width = torch.round(torch.sqrt(area / aspect)).long()
    # rand may round up to 1.0 in float32: the last corner at most
    top = torch.minimum((u[..., 2] * (rows - height + 1)).long(), rows - height)
    left = torch.minimum((u[..., 3] * (cols - width + 1)).long(), cols - width)
    return height, width, top, left


def sample_blockwise_masks(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    min_block_patches: int = 4,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
    max_blocks: int = 16,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Blockwise masks (BEiT, Bao et al. 2022, Algorithm 1; as iBOT, Zhou et al. 2022, and
    DINOv2, Oquab et al. 2024, mask their global crops) for a batch of one view, on ``device``.

    Each image gets a count of patches to hide: ``int(batch * mask_probability)`` images, in
    random places, hide ``floor(ratio * N)`` with a ratio of their own in ``mask_ratio``
    (stratified over the batch, as DINOv2's collate draws them), the others none. Rectangular
    blocks are then added to an image's mask until its count is reached. A block has an area
    uniform between ``min_block_patches`` and the patches still to hide, an aspect ratio (height
    over width) log-uniform in ``aspect_ratio``, sides rounded to whole patches and shorter than
    the grid's, and a uniformly drawn place; it is kept if it hides at least one new patch and
    no more than are still to hide. Of ``attempts`` candidates the first kept is added; where
    none is, the image's mask is final. So an image never hides more than its count, and may
    hide a few fewer, in the official code as here (measured on 20,000 images with ratios in
    [0.1, 0.5], 8x8 and 16x16 grids: 5% and 7% of them short, by 3 patches at most).

    The defaults are DINOv2's (``dinov2/configs/ssl_default_config.yaml``: ``mask_ratio_min_max
    [0.1, 0.5]``, ``mask_sample_probability 0.5``; ``dinov2/data/masking.py``: 4 patches at
    least per block, aspect ratios from 0.3 to 1/0.3, 10 attempts). iBOT's official code draws
    the same blocks with ``(min(H, W) // 3) ** 2`` patches at least per block (4 on an 8x8 grid)
    and its ratio independently per image (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: half
    the images, uniform in [0.1, 0.5], in expectation).

    Every image places its blocks at once, in ``max_blocks`` rounds over the whole batch, each
    round drawing ``attempts`` candidates per image, so nothing waits on the host; an image that
    would need more blocks stops short. The official generator, measured on 20,000 images with
    ratios in [0.1, 0.5], needed at most 10 blocks on an 8x8 grid and 17 on 16x16 (13 for
    99.9% of them).

    Returns ``(mask, counts)``: ``mask`` ``(B, N)`` booleans, True where a patch is hidden,
    row-major over ``grid`` (``ViTBackbone.grid``; ``mask.view(B, *grid)`` for the grid's
    shape), as ``ViTBackbone.tokens(images, mask=mask)`` takes it, and ``counts`` ``(B,)``
    int64, the patches each image hides (images differ). Everything is drawn from
    ``generator`` (the device's global generator when ``None``). For several views call it once
    per view; DINOv2 draws the ratios over the global crops of both views together.
    """
    _check_blockwise_ranges(
        mask_ratio, mask_probability, min_block_patches, aspect_ratio, attempts, max_blocks
    )
    target = _masked_counts(
        batch, grid[0] * grid[1], mask_ratio, mask_probability, device, generator
    )
    return _place_blocks(
        target, grid, min_block_patches, aspect_ratio, attempts, max_blocks, generator
    )


def _place_blocks(
    target: Tensor,
    grid: tuple[int, int],
    min_block_patches: int,
    aspect_ratio: tuple[float, float],
    attempts: int,
    max_blocks: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Blocks added to each image's mask, in ``max_blocks`` rounds over the batch, until the
    image hides ``target`` patches or none of a round's ``attempts`` candidates fits."""
    rows, cols = grid
    batch, device = target.shape[0], target.device
    mask = torch.zeros(batch, rows * cols, dtype=torch.bool, device=device)
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    placing = target > 0
    image = torch.arange(batch, device=device)
    for _ in range(max_blocks):
        remaining = target - counts
        height, width, top, left = _draw_blocks(
            (batch, attempts), grid, remaining, min_block_patches, aspect_ratio, generator
        )
        blocks = _block_masks(grid, (height, width), top, left)  # (B, attempts, N)
        new = (blocks & ~mask.unsqueeze(1)).sum(dim=-1)
        kept = (height < rows) & (width < cols) & (new > 0) & (new <= remaining.unsqueeze(1))
        placing = placing & kept.any(dim=1)
        first = kept.int().argmax(dim=1)
        mask |= blocks[image, first] & placing.unsqueeze(1)
        counts += new[image, first] * placing
    return mask, counts
