"""I-JEPA: the block masks (shapes, ranges, disjointness, the relaxation of a crowded grid), the
predictor's independence of blocks and of unseen patches, the targets and the loss against
formulas written out here, the EMA target encoder, the evaluation features, the refusals of a
backbone without tokens and of bad settings, a short run and a bit-exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sslplug_methods import ijepa
from torch import Tensor

import sslplug
from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.config import RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.masking import block_size, sample_block_masks
from sslplug.nn import build_backbone
from sslplug.optim import Optimization
from sslplug.plugins import PluginRegistry

from .conftest import FAST
from .harness import StopAfterEpoch

SIZE = 32  # vit_micro: 4-px patches, an 8x8 grid

# The block masks ------------------------------------------------------------------------------


def _rectangle(indices: Tensor, cols: int) -> tuple[int, int]:
    """Rows and columns of the block whose patches are ``indices``; fails unless they are
    exactly a rectangle of the grid, listed in row-major order."""
    rows_of, cols_of = (indices // cols).tolist(), (indices % cols).tolist()
    top, left = min(rows_of), min(cols_of)
    height, width = max(rows_of) - top + 1, max(cols_of) - left + 1
    expected = [(top + r) * cols + left + c for r in range(height) for c in range(width)]
    assert indices.tolist() == expected, f"not a row-major rectangle: {indices.tolist()}"
    return height, width


def _within_ranges(
    height: int,
    width: int,
    grid: tuple[int, int],
    scale: tuple[float, float],
    aspect: tuple[float, float],
) -> bool:
    """Whether a ``height x width`` block can come from a scale and an aspect ratio (height over
    width) in the ranges, up to the rounding of ``block_size``.

    Tolerance: the area is ``floor(scale * N)`` patches and each side is rounded to whole
    patches, so the exact sides lie within half a patch of ``height`` and ``width``. The exact
    area therefore lies in ``[(h - 1/2)(w - 1/2), (h + 1/2)(w + 1/2)]`` and must meet
    ``[floor(low * N), high * N]``; the exact ratio lies in ``[(h - 1/2) / (w + 1/2),
    (h + 1/2) / (w - 1/2)]`` and must meet the aspect range.
    """
    n = grid[0] * grid[1]
    area_ok = (height - 0.5) * (width - 0.5) <= scale[1] * n and (height + 0.5) * (
        width + 0.5
    ) >= math.floor(scale[0] * n)
    ratio_ok = (height - 0.5) / (width + 0.5) <= aspect[1] and (height + 0.5) / (
        width - 0.5
    ) >= aspect[0]
    return area_ok and ratio_ok


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (6, 10)])
def test_target_blocks_are_rectangles_in_the_grid_within_the_scale_and_aspect_ranges(
    grid: tuple[int, int],
) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(40):
        _, targets = sample_block_masks(16, grid, generator=g)
        assert targets.shape[:2] == (16, 4) and targets.dtype == torch.int64
        assert targets.min() >= 0 and targets.max() < grid[0] * grid[1]
        shapes = {_rectangle(block, grid[1]) for block in targets.flatten(0, 1)}
        assert len(shapes) == 1, "block sizes are drawn once per batch"
        height, width = shapes.pop()
        assert height * width == targets.shape[2]
        assert _within_ranges(height, width, grid, (0.15, 0.2), (0.75, 1.5)), (height, width)
        sizes.add((height, width))
    assert len(sizes) > 1, "every batch drew the same block size"


@pytest.mark.parametrize("grid", [(8, 8), (14, 14)])
def test_context_block_before_removal_is_a_square_of_scale_0_85_to_1(
    grid: tuple[int, int],
) -> None:
    """With no targets to remove, the context is its block: a square of the same size for the
    whole batch, at positions of its own for each image."""
    g = torch.Generator().manual_seed(1)
    corners = set()
    for _ in range(20):
        context, _ = sample_block_masks(16, grid, num_targets=0, generator=g)
        shapes = {_rectangle(row, grid[1]) for row in context}
        assert len(shapes) == 1
        height, width = shapes.pop()
        assert height == width  # aspect ratio 1 on a square grid
        assert _within_ranges(height, width, grid, (0.85, 1.0), (1.0, 1.0)), (height, width)
        corners |= {int(row[0]) for row in context}
    assert len(corners) > 1


def test_context_never_overlaps_a_target_and_stacks_across_the_batch() -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(40):
        context, targets = sample_block_masks(32, (8, 8), generator=g)
        assert context.shape[0] == 32 and context.shape[1] >= 10  # min_keep
        for row, blocks in zip(context.tolist(), targets.tolist()):
            assert row == sorted(set(row)), "context patches are listed once, in order"
            assert not set(row) & {p for block in blocks for p in block}


def test_positions_differ_across_images_and_the_draws_replay() -> None:
    torch.manual_seed(3)
    context, targets = sample_block_masks(16, (8, 8))
    assert len({tuple(row) for row in targets[:, 0].tolist()}) > 4
    assert len({tuple(row) for row in context.tolist()}) > 4
    torch.manual_seed(3)  # the global generator by default: a resumed run draws the same masks
    again = sample_block_masks(16, (8, 8))
    assert torch.equal(again[0], context) and torch.equal(again[1], targets)


def test_a_crowded_grid_lets_the_last_targets_into_the_context() -> None:
    """Four 6x6 targets on an 8x8 grid leave too little of the whole-grid context: the first
    target stays out of it (64 - 36 = 28 patches are left), later ones come in."""
    g = torch.Generator().manual_seed(4)
    context, targets = sample_block_masks(
        32,
        (8, 8),
        target_scale=(0.5, 0.5),
        target_aspect_ratio=(1.0, 1.0),
        context_scale=(1.0, 1.0),
        min_keep=20,
        generator=g,
    )
    assert targets.shape == (32, 4, 36) and context.shape[1] >= 20
    overlaps = 0
    for row, blocks in zip(context.tolist(), targets.tolist()):
        assert not set(row) & set(blocks[0])
        overlaps += bool(set(row) & {p for block in blocks[1:] for p in block})
    assert overlaps > 0


def test_block_size_rounds_each_side_and_stays_in_the_grid() -> None:
    assert block_size((8, 8), 0.15, 1.0) == (3, 3)  # floor(9.6) = 9 patches
    assert block_size((8, 8), 0.2, 1.5) == (4, 3)  # 12 patches: sqrt(18), sqrt(8)
    assert block_size((8, 8), 1.0, 1.0) == (8, 8)
    assert block_size((2, 2), 0.15, 1.0) == (1, 1)  # never empty
    assert block_size((4, 4), 1.0, 4.0) == (4, 2)  # 8 rows asked, 4 there


def test_impossible_mask_arguments_are_refused_naming_the_values() -> None:
    with pytest.raises(ValueError, match=r"holds 49 patches, fewer than min_keep=50"):
        sample_block_masks(2, (8, 8), min_keep=50)
    with pytest.raises(ValueError, match=r"target_aspect_ratio .* got \(2.0, 1.0\)"):
        sample_block_masks(2, (8, 8), target_aspect_ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"context_scale .* got \(0.0, 1.0\)"):
        sample_block_masks(2, (8, 8), context_scale=(0.0, 1.0))


# The components -------------------------------------------------------------------------------


def _build(registry: PluginRegistry, *assignments: str, backbone: str = "vit_micro") -> Any:
    config = load_config(
        None, ["components.plugin=ijepa", *assignments], registry.settings_classes()
    )
    net, dim = build_backbone(backbone, SIZE, pool=config.model.pool)
    run = RunContext(
        config=config, image_size=SIZE, steps_per_epoch=5, total_steps=100, backbone=net
    )
    return registry.build(config, run, net, dim)


def _batch(n: int = 4, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)


def test_views_carry_one_cropped_image_and_the_masks_of_its_grid(registry: PluginRegistry) -> None:
    parts = _build(registry)
    views = parts.views(_batch())
    assert len(views.images) == 1 and views.images[0].shape == (4, 3, SIZE, SIZE)
    context, targets = views.targets["context"], views.targets["target_blocks"]
    assert context.shape[0] == 4 and targets.shape[:2] == (4, 4)
    assert targets.max() < 64
    assert "block_masks" in parts.views.provides and "patch_tokens" in parts.views.requires


def test_predictor_predicts_each_block_on_its_own_from_the_context_only(
    registry: PluginRegistry,
) -> None:
    parts = _build(registry)
    encoder = parts.encoder.eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    context = torch.tensor([[0, 1, 2, 8, 9, 10, 16, 17, 18, 19]] * 2)
    targets = torch.tensor([[[36, 37, 44, 45], [54, 55, 62, 63]]] * 2)

    def predict(images: Tensor, targets: Tensor) -> Tensor:
        views = sslplug.Views((images,), {"context": context, "target_blocks": targets})
        with torch.no_grad():
            return encoder(views).predictions[0]

    first = predict(images, targets)
    assert first.shape == (2, 2, 4, 128)
    # another second block: the first block's predictions stay, the second's change
    moved = targets.clone()
    moved[:, 1] = torch.tensor([4, 5, 12, 13])
    second = predict(images, moved)
    torch.testing.assert_close(second[:, 0], first[:, 0])
    assert not torch.allclose(second[:, 1], first[:, 1])
    # pixels of a patch outside the context (row 7, column 7) are never seen
    hidden = images.clone()
    hidden[:, :, 28:, 28:] = 5.0
    torch.testing.assert_close(predict(hidden, targets), first)
    seen = images.clone()
    seen[:, :, :4, :4] = 5.0  # patch 0, in the context
    assert not torch.allclose(predict(seen, targets), first)


def reference_targets(tokens: list[list[list[float]]], blocks: list[list[list[int]]]) -> Tensor:
    """Each patch token normalised over its features, ``(x - mean) / sqrt(var + 1e-5)`` with the
    biased variance (``F.layer_norm`` without affine parameters), at the blocks' patches."""
    out = []
    for image, image_blocks in zip(tokens, blocks):
        normed = []
        for x in image:
            mean = sum(x) / len(x)
            var = sum((v - mean) ** 2 for v in x) / len(x)
            normed.append([(v - mean) / math.sqrt(var + 1e-5) for v in x])
        out.append([[normed[p] for p in block] for block in image_blocks])
    return torch.tensor(out)


def test_targets_are_the_whole_images_layer_normed_tokens_at_the_blocks(
    registry: PluginRegistry,
) -> None:
    parts = _build(registry)
    views = parts.views(_batch())
    with torch.no_grad():
        target = parts.target_update(views).extras["block_targets"]
        _, tokens = parts.target_update.network.tokens(views.images[0])
    blocks = views.targets["target_blocks"]
    assert target.shape == (*blocks.shape, 128)
    expected = reference_targets(tokens.tolist(), blocks.tolist())
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)


def reference_loss(prediction: list, target: list) -> float:
    """Smooth L1 (beta 1) per element: ``d^2 / 2`` where ``|d| < 1``, else ``|d| - 1/2``;
    averaged over each block's patches and features, then over blocks and images."""
    per_block = []
    for image_p, image_t in zip(prediction, target):
        for block_p, block_t in zip(image_p, image_t):
            terms = [
                0.5 * (p - t) ** 2 if abs(p - t) < 1 else abs(p - t) - 0.5
                for patch_p, patch_t in zip(block_p, block_t)
                for p, t in zip(patch_p, patch_t)
            ]
            per_block.append(sum(terms) / len(terms))
    return sum(per_block) / len(per_block)


def test_loss_matches_smooth_l1_averaged_over_blocks_written_out() -> None:
    g = torch.Generator().manual_seed(5)
    prediction = (2.0 * torch.randn(3, 4, 5, 6, generator=g)).requires_grad_()
    target = torch.randn(3, 4, 5, 6, generator=g)
    views = sslplug.Views(
        (torch.zeros(3, 3, SIZE, SIZE),),
        {"context": torch.zeros(3, 11, dtype=torch.long), "target_blocks": torch.zeros(3, 4, 5)},
    )
    result = ijepa.IJEPALoss()(
        sslplug.Outputs(predictions=(prediction,)),
        views,
        sslplug.Outputs(extras={"block_targets": target}),
    )
    differences = (prediction - target).abs()
    assert (differences < 1).any() and (differences > 1).any()  # both branches are used
    expected = reference_loss(prediction.tolist(), target.tolist())
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.metrics["context_patches"].item() == 11
    assert result.metrics["target_patches"].item() == 5
    std = target.reshape(-1, 6).std(dim=0).mean()
    torch.testing.assert_close(result.metrics["target_std"], std)
    result.loss.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0


def test_target_is_not_trained_by_the_optimiser_and_moves_by_ema_after_a_step(
    registry: PluginRegistry,
) -> None:
    torch.manual_seed(6)
    parts = _build(registry)
    target = parts.target_update
    assert parts.encoder.settings.ema == (0.996, 1.0)
    assert [target.momentum(s, 100) for s in (0, 50, 100)] == pytest.approx([0.996, 0.998, 1.0])
    optimization = Optimization(
        load_config(None, [], registry.settings_classes()).optim,
        [parts.encoder, parts.loss],
        steps_per_epoch=5,
        total_steps=100,
        rules=parts.optim_rules(),
    )
    trained = {id(p) for group in optimization.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in target.parameters())
    assert not any(p.requires_grad for p in target.parameters())

    views = parts.views(_batch(8))
    with torch.no_grad():
        goal = target(views)
    before = {k: v.clone() for k, v in target.network.state_dict().items()}
    online_before = {k: v.clone() for k, v in parts.encoder.backbone.state_dict().items()}
    optimization.zero_grad()
    parts.loss(parts.encoder(views), views, goal).loss.backward()
    optimization.step(0)
    assert all(torch.equal(v, before[k]) for k, v in target.network.state_dict().items())
    online = parts.encoder.backbone.state_dict()
    assert not torch.equal(online["vit.blocks.0.attn.qkv.weight"], online_before[
        "vit.blocks.0.attn.qkv.weight"
    ])  # fmt: skip

    metrics = target.step(parts.encoder, 10, 100)
    assert metrics == {"momentum": pytest.approx(0.9964)}
    for key, value in target.network.state_dict().items():
        torch.testing.assert_close(value, 0.9964 * before[key] + 0.0036 * online[key])


def test_weight_decay_follows_the_official_cosine_from_0_04_to_0_4(
    registry: PluginRegistry,
) -> None:
    parts = _build(registry, "optim.weight_decay=1e-4")
    (rules,) = parts.optim_rules()
    (group,) = rules.groups
    assert group.weight_decay == 0.04 and group.params is parts.encoder
    assert rules.weight_decay_end is None  # the deprecated absolute form is gone
    assert rules.weight_decay_end_factor == pytest.approx(10.0)  # 0.4 / 0.04, relative
    assert group.lr_scale == 0.25  # a quarter of optim.lr: 5e-4 at the core's 2e-3
    assert _build(registry, "ijepa.lr_scale=1.0").optim_rules()[0].groups[0].lr_scale == 1.0


@pytest.mark.parametrize(("pool", "token"), [("auto", False), ("token", True), ("avg", False)])
def test_evaluation_features_are_the_mean_patch_token_under_pool_auto(
    registry: PluginRegistry, pool: str, token: bool
) -> None:
    encoder = _build(registry, f"model.pool={pool}").encoder.eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        prefix, patches = encoder.backbone.tokens(images)
        features = encoder.features(images)
    torch.testing.assert_close(features, prefix[:, 0] if token else patches.mean(dim=1))


# Refusals -------------------------------------------------------------------------------------


def test_a_backbone_without_tokens_is_refused_before_the_first_step_naming_ijepa(
    registry: PluginRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, backbone="small")
    message = str(info.value)
    assert "plugin 'ijepa' cannot build its encoder" in message
    assert "needs the patch tokens of a Vision Transformer" in message and "vit_micro" in message
    assert main(["run", "--plugin", "ijepa", "--backbone", "small", "--no-progress"]) == 2
    assert "'ijepa'" in capsys.readouterr().err


def test_other_views_without_block_masks_are_refused_naming_both(registry: PluginRegistry) -> None:
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "components.views=simclr")
    message = str(info.value)
    assert "requires block_masks" in message and "views from 'simclr'" in message


def test_without_the_target_encoder_the_loss_is_refused_naming_block_targets(
    registry: PluginRegistry,
) -> None:
    with pytest.raises(ComponentMismatchError, match=r"'ijepa' requires block_targets"):
        _build(registry, "components.target_update=none")


def test_simclrs_two_views_feed_ijepa_the_first_one_masked(registry: PluginRegistry) -> None:
    parts = _build(registry, "components.augmentation=simclr")
    views = parts.views(_batch())
    assert len(views.images) == 2 and "two_views" in parts.views.provides
    with torch.no_grad():
        target = parts.target_update(views)
    result = parts.loss(parts.encoder(views), views, target)
    assert math.isfinite(result.loss.item())


def test_ijepa_registers_its_capabilities(registry: PluginRegistry) -> None:
    names = [c.name for c in registry.capabilities_of("ijepa")]
    assert names == ["block_masks", "block_predictions", "block_targets"]


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("ijepa.pred_mask_scale=[0.3, 0.2]", r"pred_mask_scale must be a range .*\(0.3, 0.2\)"),
        ("ijepa.enc_mask_scale=[0.0, 1.0]", r"enc_mask_scale must be a range .*\(0.0, 1.0\)"),
        ("ijepa.aspect_ratio=[1.5, 0.75]", r"aspect_ratio must be a range .*\(1.5, 0.75\)"),
        ("ijepa.ema=[1.0, 0.996]", r"ema must be \(start, end\) .*\(1.0, 0.996\)"),
        ("ijepa.pred_emb_dim=30", "pred_emb_dim must be a positive multiple of 4 .*got 30"),
        ("ijepa.pred_num_heads=3", "pred_emb_dim 64 must be a multiple of pred_num_heads 3"),
        ("ijepa.num_pred_masks=0", "num_pred_masks must be greater than 0, got 0"),
        ("ijepa.min_keep=0", "min_keep must be greater than 0, got 0"),
        ("ijepa.crop_scale=[0.3, 1.5]", r"crop_scale must be a range .*\(0.3, 1.5\)"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(
    registry: PluginRegistry, setting: str, shown: str
) -> None:
    with pytest.raises(ConfigError, match=shown):
        load_config(None, ["components.plugin=ijepa", setting], registry.settings_classes())


def test_masks_the_patch_grid_cannot_hold_are_refused_at_set_up(registry: PluginRegistry) -> None:
    with pytest.raises(ComponentMismatchError, match=r"8x8 patch grid.*fewer than min_keep=50"):
        _build(registry, "ijepa.min_keep=50")


# A short run ----------------------------------------------------------------------------------


def test_short_run_on_vit_micro_finishes_and_moves_the_target(
    shapes_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["run", "--plugin", "ijepa", "--backbone", "vit_micro", "--data", str(shapes_folder)]
    args += ["--epochs", "1", "--out", str(out)]
    for item in [*FAST, "knn.baseline=false", "health.baseline=false"]:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["components"].values()) == {"ijepa"}
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert "knn_top1" in json.dumps(summary)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    key = "vit.blocks.0.attn.qkv.weight"
    online = checkpoint["encoder"][f"backbone.{key}"]
    target = checkpoint["target_update"][f"network.{key}"]
    assert not torch.equal(online, target)  # the target trails the online encoder
    assert "predictor.mask_token" in checkpoint["encoder"]


def _three_epochs(shapes_folder: Path, out: Path, *extra: object) -> tuple[Any, PluginRegistry]:
    registry = PluginRegistry()
    registry.load_entry_points()
    for index, plugin in enumerate(extra):
        assert registry.register(plugin, f"extra{index}"), registry.failures
    config = load_config(
        None,
        [
            "components.plugin=ijepa",
            "model.backbone=vit_micro",
            f"data.name={shapes_folder}",
            "data.workers=0",
            "train.epochs=3",
            "train.batch_size=32",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "knn.every=0",
            "health.every=0",
            f"train.out={out}",
        ],
        registry.settings_classes(),
    )
    return config, registry


@pytest.mark.slow  # three short runs of six steps
def test_resume_is_bit_exact_masks_and_target_included(shapes_folder: Path, tmp_path: Path) -> None:
    """3 epochs straight against a run stopped after epoch 2 and resumed: the same weights of
    encoder, predictor and target encoder, so the masks drawn after the resume were the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit must reduce in the same order
    try:
        train(*_three_epochs(shapes_folder, tmp_path / "straight"))
        with pytest.raises(KeyboardInterrupt):
            train(*_three_epochs(shapes_folder, tmp_path / "resumed", StopAfterEpoch(2)))
        config, registry = _three_epochs(shapes_folder, tmp_path / "resumed")
        train(config, registry, resume=tmp_path / "resumed")
    finally:
        torch.set_num_threads(before)
    straight, resumed = (load_checkpoint(tmp_path / name) for name in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 6
    for component in ("encoder", "target_update"):
        assert resumed[component].keys() == straight[component].keys(), component
        for key, value in straight[component].items():
            assert torch.equal(resumed[component][key], value), f"{component}.{key}"
