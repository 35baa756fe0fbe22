"""Jigsaw: the permutation set, tiles and their labels, the loss, and a short run."""

from __future__ import annotations

import itertools

import pytest
import torch
from sslplug_methods import jigsaw
from torch import nn

from sslplug import Outputs, Views
from sslplug.nn import SmallConvNet


def _min_distance(perms: torch.Tensor) -> int:
    distances = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    distances.fill_diagonal_(99)
    return int(distances.min())


def test_permutation_set_size_distinct_spread_and_deterministic():
    perms = jigsaw.permutation_set(100)
    assert perms.shape == (100, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == 100
    assert perms[0].tolist() == list(range(9))
    assert _min_distance(perms) >= 6  # far apart: a random 100 from 9! would have pairs at 2
    jigsaw.permutation_set.cache_clear()
    assert torch.equal(jigsaw.permutation_set(100), perms)


def test_greedy_choice_maximises_the_smallest_distance():
    perms = jigsaw.permutation_set(3)
    every = torch.tensor(list(itertools.permutations(range(9))))
    nearest = torch.minimum((every != perms[0]).sum(1), (every != perms[1]).sum(1))
    assert int((perms[2] != perms[0]).sum().minimum((perms[2] != perms[1]).sum())) == int(
        nearest.max()
    )


def test_tiles_come_from_their_cells_with_gaps():
    image = torch.arange(30 * 30, dtype=torch.float32).view(1, 1, 30, 30)
    tiles = jigsaw.cut_tiles(image, tile=8, jitter=False)
    assert tiles.shape == (1, 9, 1, 8, 8)
    # cell (1, 2) spans rows 10-19 and columns 20-29; centred 8-pixel tile starts one pixel in
    assert torch.equal(tiles[0, 5, 0], image[0, 0, 11:19, 21:29])
    jittered = jigsaw.cut_tiles(image.expand(50, 1, 30, 30), tile=8, jitter=True)
    starts = jittered[:, 4, 0, 0, 0]  # top-left pixel of the centre tile
    rows, cols = starts // 30, starts % 30
    assert rows.min() >= 10 and rows.max() <= 12 and cols.min() >= 10 and cols.max() <= 12
    assert len(set(starts.tolist())) > 1


def test_every_label_names_a_permutation_that_restores_the_tile_order():
    tiles = torch.randn(4, 9, 3, 5, 5)
    perms = jigsaw.permutation_set(100)
    labels = torch.tensor([0, 7, 42, 99])
    shuffled = jigsaw.shuffle_tiles(tiles, perms[labels])
    for b, label in enumerate(labels.tolist()):
        restored = torch.empty_like(tiles[b])
        restored[perms[label]] = shuffled[b]  # tile at position p goes back to cell perm[p]
        assert torch.equal(restored, tiles[b])
    assert not torch.equal(shuffled[1], tiles[1])


def test_views_are_standardised_shuffled_tiles_with_labels():
    generator = jigsaw.JigsawViews(nn.Identity(), jigsaw.permutation_set(10), 0.8, upsample_to=0)
    views = generator(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8))
    (tiles,) = views.images
    assert tiles.shape == (6 * 9, 3, 8, 8)
    labels = views.targets["permutation"]
    assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < 10
    means = tiles.mean(dim=(-2, -1))
    assert means.abs().max() < 1e-4  # each tile's colour and brightness are gone


def test_upsampling_gives_larger_tiles():
    generator = jigsaw.JigsawViews(nn.Identity(), jigsaw.permutation_set(10), 0.8, upsample_to=96)
    (tiles,) = generator(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).images
    assert tiles.shape == (18, 3, 25, 25)


def test_encoder_concatenates_tile_features_in_order():
    backbone = SmallConvNet(width=4)
    settings = jigsaw.JigsawSettings(num_permutations=10, classifier_hidden_dim=16)
    encoder = jigsaw.JigsawEncoder(backbone, backbone.out_dim, settings)
    tiles = torch.randn(18, 3, 8, 8)
    out = encoder(Views(images=(tiles,)))
    assert out.logits.shape == (2, 10)
    encoder.eval()
    swapped = tiles.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not torch.allclose(
        encoder(Views(images=(swapped,))).logits[0], encoder(Views(images=(tiles,))).logits[0]
    )


def test_evaluation_features_are_the_unshuffled_tile_grid():
    backbone = SmallConvNet(width=4)
    settings = jigsaw.JigsawSettings(num_permutations=10, classifier_hidden_dim=16)
    encoder = jigsaw.JigsawEncoder(backbone, backbone.out_dim, settings)
    encoder.eval()
    images = torch.randn(2, 3, 32, 32)
    features = encoder.features(images)
    assert encoder.feature_dim == 9 * 32 and features.shape == (2, 9 * 32)
    tiles = jigsaw.standardise_tiles(jigsaw.cut_tiles(images, 8, jitter=False))
    expected = torch.cat([backbone(tiles[:, k]) for k in range(9)], dim=1)
    torch.testing.assert_close(features, expected)


def test_loss_is_cross_entropy_of_the_permutation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    views = Views(images=(torch.zeros(18, 3, 4, 4),), targets={"permutation": torch.tensor([0, 2])})
    loss, metrics = jigsaw.sslplug_loss()(Outputs(logits=logits), views, None)
    import math

    expected = (-2 + math.log(math.exp(2) + 2) + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["permutation_accuracy"].item() == pytest.approx(0.5)


def test_short_run_end_to_end(fast_args, tmp_path):
    import json

    from sslplug.cli import main

    assert main([*fast_args, "--plugin", "jigsaw", "--set", "jigsaw.classifier_hidden_dim=32"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["components"]["loss"] == "jigsaw" and summary["knn_top1"] is not None
