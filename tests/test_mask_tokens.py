"""Masked tokens in the core: a ViT's learned mask token (``ViTBackbone.enable_mask_token``,
``tokens(images, mask=...)``) and the blockwise mask sampler of BEiT, iBOT and DINOv2
(``sample_blockwise_masks``)."""

from __future__ import annotations

import copy
import math
import time

import pytest
import timm
import torch
from torch import nn

import sslplug
from sslplug.masking import _draw_blocks, _masked_counts, sample_blockwise_masks
from sslplug.nn import build_backbone
from sslplug.vit import ViTBackbone


def _vit() -> ViTBackbone:
    torch.manual_seed(0)
    backbone = build_backbone("vit_micro", 32)[0].eval()
    assert isinstance(backbone, ViTBackbone)
    return backbone


def _blocks_input(backbone: ViTBackbone, images: torch.Tensor, mask: torch.Tensor | None):
    """The tokens that enter the first block: patch embeddings, class token, position."""
    seen: list[torch.Tensor] = []
    hook = backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    backbone.tokens(images, mask=mask)
    hook.remove()
    return seen[0]


def test_the_mask_token_replaces_exactly_the_masked_patches_before_the_position_embedding():
    backbone = _vit()
    with torch.no_grad():
        backbone.enable_mask_token().normal_()  # zeros at first; any value must land as it is
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) < 0.4
    plain = _blocks_input(backbone, images, None)
    masked = _blocks_input(backbone, images, mask)
    # the class token and every patch not masked: untouched, bit for bit
    assert torch.equal(masked[:, 0], plain[:, 0])
    assert torch.equal(masked[:, 1:][~mask], plain[:, 1:][~mask])
    # a masked patch: the mask token plus the position embedding of its place
    token = backbone.mask_token
    assert token is not None and token.shape == (1, 1, 128)
    positions = backbone.vit.pos_embed[0, 1:].expand(2, -1, -1)
    expected = token[0, 0] + positions[mask]
    assert torch.allclose(masked[:, 1:][mask], expected, atol=1e-6)
    assert not torch.allclose(masked[:, 1:][mask], plain[:, 1:][mask], atol=1e-3)


def test_an_all_false_mask_gives_what_no_mask_gives_bit_for_bit():
    backbone = _vit()
    backbone.enable_mask_token()
    images = torch.randn(3, 3, 32, 32)
    prefix, patches = backbone.tokens(images)
    nothing = torch.zeros(3, 64, dtype=torch.bool)
    prefix_masked, patches_masked = backbone.tokens(images, mask=nothing)
    assert torch.equal(prefix, prefix_masked) and torch.equal(patches, patches_masked)
    # with ``keep`` too: masking happens before the patches are dropped
    keep = torch.tensor([[0, 5, 9]] * 3)
    assert torch.equal(backbone.tokens(images, keep)[1], backbone.tokens(images, keep, nothing)[1])


def test_the_gradient_reaches_the_mask_token_only_through_masked_patches():
    backbone = _vit()
    token = backbone.enable_mask_token()
    assert backbone.enable_mask_token() is token  # one token, made once
    images = torch.randn(2, 3, 32, 32)
    backbone.tokens(images, mask=torch.zeros(2, 64, dtype=torch.bool))[1].square().sum().backward()
    assert token.grad is not None and torch.count_nonzero(token.grad) == 0
    token.grad = None
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 10] = True
    backbone.tokens(images, mask=mask)[1].square().sum().backward()
    assert token.grad is not None and torch.count_nonzero(token.grad) > 0


def test_masks_are_refused_without_a_token_or_of_the_wrong_shape():
    backbone = _vit()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"call backbone.enable_mask_token\(\)"):
        backbone.tokens(images, mask=torch.zeros(2, 64, dtype=torch.bool))
    backbone.enable_mask_token()
    with pytest.raises(ValueError, match=r"\(B, N\) = \(2, 64\).*got torch.bool \(2, 16\)"):
        backbone.tokens(images, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got torch.int64 \(2, 64\)"):
        backbone.tokens(images, mask=torch.zeros(2, 64, dtype=torch.long))


def test_encoders_saved_with_or_without_a_mask_token_load_and_export_leaves_it_out():
    old = _vit()
    assert "mask_token" not in old.state_dict()  # a backbone as every existing run saved it
    fresh = _vit()
    fresh.load_state_dict(old.state_dict())  # strict
    assert fresh.mask_token is None

    masked = _vit()
    with torch.no_grad():
        masked.enable_mask_token().fill_(0.5)
    saved = nn.Sequential(masked).state_dict()  # under a prefix, as inside an encoder
    assert saved["0.mask_token"].shape == (1, 1, 128)
    # an encoder rebuilt for evaluation or export, or a teacher's copy, gets the token on load
    rebuilt = copy.deepcopy(nn.Sequential(_vit()))
    rebuilt.load_state_dict(saved)  # strict
    assert torch.equal(rebuilt[0].mask_token, masked.mask_token)

    exported = masked.exported_state_dict()
    assert not any("mask_token" in key for key in exported)
    net = timm.create_model(masked.timm_name, num_classes=0, **masked.timm_args)
    net.load_state_dict(exported)  # strict: timm's own keys, nothing more


def test_blockwise_counts_stay_in_the_ratio_range_and_never_pass_their_target():
    grid, batch = (8, 8), 256
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    target = _masked_counts(batch, 64, (0.1, 0.5), 1.0, "cpu", g)
    g.set_state(state)
    mask, counts = sample_blockwise_masks(batch, grid, mask_probability=1.0, generator=g)
    assert mask.shape == (batch, 64) and mask.dtype == torch.bool and counts.shape == (batch,)
    assert torch.equal(mask.sum(dim=1), counts)
    # each image's target is floor(ratio * N), the ratios stratified over [0.1, 0.5): all of it
    assert target.min() == math.floor(0.1 * 64) and target.max() == math.ceil(0.5 * 64) - 1
    assert len(target.unique()) == 26
    # the official generator's guarantee: never more than the target; it may fall a few short
    # when no candidate block fits, less than one smallest block
    assert (counts <= target).all()
    assert (counts > target - 4).all()
    assert (counts < target).float().mean() < 0.1


def test_blockwise_masks_only_a_share_of_the_images():
    g = torch.Generator().manual_seed(1)
    _, counts = sample_blockwise_masks(256, (8, 8), mask_probability=0.5, generator=g)
    assert (counts > 0).sum() == 128
    _, counts = sample_blockwise_masks(8, (8, 8), mask_probability=0.0, generator=g)
    assert (counts == 0).all()


def test_candidate_blocks_keep_the_aspect_range_up_to_whole_patches_and_fit_the_grid():
    g = torch.Generator().manual_seed(2)
    remaining = torch.randint(1, 33, (256,), generator=g)
    low, high = 0.3, 1 / 0.3
    height, width, top, left = _draw_blocks((256, 10), (8, 8), remaining, 4, (low, high), g)
    # each side is its exact length rounded, so the exact ratio lies within half a patch of each
    assert (height >= 1).all() and (width >= 1).all()
    assert ((height - 0.5) / (width + 0.5) <= high).all()
    assert ((height + 0.5) / (width - 0.5) >= low).all()
    assert (height / width).min() < 0.5 and (height / width).max() > 2  # the range is used
    fits = (height < 8) & (width < 8)
    assert fits.float().mean() > 0.9
    assert ((top >= 0) & (top + height <= 8) & (left >= 0) & (left + width <= 8))[fits].all()


@pytest.mark.parametrize(("aspect", "shape"), [(1.0, (2, 2)), (4.0, (4, 1)), (0.25, (1, 4))])
def test_a_single_block_has_the_aspect_asked_for_height_over_width(aspect, shape):
    # a target of 4 patches and blocks of exactly 4: one block per image, of area 4
    g = torch.Generator().manual_seed(3)
    ratio = 4 / 64
    mask, counts = sample_blockwise_masks(
        64, (8, 8), (ratio, ratio), 1.0, aspect_ratio=(aspect, aspect), generator=g
    )
    assert (counts == 4).all()
    grid = mask.view(64, 8, 8)
    rows = grid.any(dim=2).sum(dim=1)
    cols = grid.any(dim=1).sum(dim=1)
    assert (rows == shape[0]).all() and (cols == shape[1]).all()
    assert len({tuple(m.nonzero()[0].tolist()) for m in grid}) > 10  # placed all over the grid


def test_blockwise_draws_replay_from_a_seeded_generator_and_differ_across_seeds():
    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_blockwise_masks(32, (8, 8), generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(4), draw(4), draw(5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_a_batch_of_256_is_drawn_quickly_on_the_cpu_and_feeds_the_tokens():
    g = torch.Generator().manual_seed(6)
    sample_blockwise_masks(256, (8, 8), generator=g)
    start = time.perf_counter()
    mask, _ = sample_blockwise_masks(256, (8, 8), generator=g)
    assert time.perf_counter() - start < 1.0  # about 20 ms on one thread of a shared EPYC core
    backbone = _vit()
    backbone.enable_mask_token()
    _, patches = backbone.tokens(torch.randn(4, 3, 32, 32), mask=mask[:4])
    assert patches.shape == (4, 64, 128)


def test_impossible_blockwise_settings_are_refused_naming_the_values():
    with pytest.raises(ValueError, match=r"mask_ratio must be a range.*got \(0.6, 0.2\)"):
        sample_blockwise_masks(2, (8, 8), mask_ratio=(0.6, 0.2))
    with pytest.raises(ValueError, match=r"mask_probability 1.5 must be in \[0, 1\]"):
        sample_blockwise_masks(2, (8, 8), mask_probability=1.5)
    with pytest.raises(ValueError, match=r"aspect_ratio must be a range.*got \(0.0, 1.0\)"):
        sample_blockwise_masks(2, (8, 8), aspect_ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"got 4, 0, 16"):
        sample_blockwise_masks(2, (8, 8), attempts=0)


def test_the_sampler_is_public():
    assert sslplug.sample_blockwise_masks is sample_blockwise_masks
