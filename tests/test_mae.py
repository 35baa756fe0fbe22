"""MAE: the masks, the loss against Section 3 written out (masked patches only), the encoder
that sees only the visible patches, the refusal of a backbone without tokens, the optimiser's
weight decay, a short run through the command line, bit-exact resume, and bad settings."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from sslplug_methods import mae
from torch import Tensor

import sslplug
from sslplug import Outputs, Views
from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.config import OptimSettings, RunConfig, RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.nn import build_backbone
from sslplug.optim import Optimization
from sslplug.plugins import PluginRegistry
from sslplug.vit import ViTBackbone, build_timm_backbone

from .harness import StopAfterEpoch


def vit(image_size: int = 32, patch_size: int = 4) -> ViTBackbone:
    backbone, _ = build_timm_backbone("vit_micro", image_size, patch_size=patch_size)
    assert isinstance(backbone, ViTBackbone)
    return backbone


def view_generator(
    backbone: ViTBackbone, image_size: int, mask_ratio: float
) -> mae.MaskedViewGenerator:
    run = RunContext(config=RunConfig(), image_size=image_size, backbone=backbone)
    augmentations = mae.sslplug_augmentation(mae.MAESettings(), run)
    return mae.MaskedViewGenerator(augmentations, mask_ratio, run)


def uint8_batch(n: int, size: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# The mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.1, 0.9])
@pytest.mark.parametrize(
    ("image_size", "patch_size", "patches"),
    [(32, 4, 64), (32, 8, 16), (24, 4, 36), (20, 8, 9)],  # 20 px: padded to a 3 x 3 grid
)
def test_mask_hides_the_requested_share_of_every_image(
    mask_ratio: float, image_size: int, patch_size: int, patches: int
) -> None:
    torch.manual_seed(0)
    generator = view_generator(vit(image_size, patch_size), image_size, mask_ratio)
    views = generator(uint8_batch(8, image_size))
    keep, masked = views.targets["keep"], views.targets["masked"]
    hidden = round(mask_ratio * patches)
    assert views.images[0].shape == (8, 3, image_size, image_size)
    assert keep.shape == (8, patches - hidden) and masked.shape == (8, hidden)
    assert keep.dtype == masked.dtype == torch.int64
    for row_keep, row_masked in zip(keep.tolist(), masked.tolist(), strict=True):
        assert not set(row_keep) & set(row_masked)
        assert sorted(row_keep + row_masked) == list(range(patches))
    assert len({tuple(row) for row in masked.tolist()}) > 1  # drawn per image


def test_masks_come_from_the_global_random_state_so_a_resumed_run_draws_them_again() -> None:
    generator = view_generator(vit(), 32, 0.75)
    batch = uint8_batch(6, 32)

    def masks(seed: int) -> Tensor:
        torch.manual_seed(seed)
        return generator(batch).targets["masked"]

    assert torch.equal(masks(5), masks(5))
    assert not torch.equal(masks(5), masks(6))


def test_view_generator_declares_what_it_needs_and_gives() -> None:
    generator = view_generator(vit(), 32, 0.75)
    assert generator.requires == {"normalized_views", "patch_tokens"}
    assert generator.provides == {"patch_mask"}


# The loss ------------------------------------------------------------------------------------


def reference_loss(
    images: Tensor, predictions: Tensor, masked: Tensor, patch: int, norm_pix: bool
) -> float:
    """He et al. 2022, Section 3, in plain Python: patch ``k`` is row ``k // cols``, column
    ``k % cols`` of the grid (the image padded with zeros to whole patches); its pixels in
    (row, column, channel) order; each normalised by its own mean and unbiased variance when
    ``norm_pix``; the squared error averaged over pixels, then over the hidden patches."""
    pixels = images.tolist()
    preds = predictions.tolist()
    _, channels, height, width = images.shape
    cols = math.ceil(width / patch)

    def pixel(b: int, c: int, y: int, x: int) -> float:
        return pixels[b][c][y][x] if y < height and x < width else 0.0

    total, count = 0.0, 0
    for b, hidden in enumerate(masked.tolist()):
        for k in hidden:
            row, col = divmod(k, cols)
            target = [
                pixel(b, c, row * patch + i, col * patch + j)
                for i in range(patch)
                for j in range(patch)
                for c in range(channels)
            ]
            if norm_pix:
                mean = sum(target) / len(target)
                var = sum((t - mean) ** 2 for t in target) / (len(target) - 1)
                target = [(t - mean) / math.sqrt(var + 1e-6) for t in target]
            total += sum((p - t) ** 2 for p, t in zip(preds[b][k], target)) / len(target)
            count += 1
    return total / count


def loss_inputs(
    size: int = 12, patch: int = 4, seed: int = 0
) -> tuple[Views, Tensor, Tensor, Tensor]:
    """Random images, predictions for each of their patches and a random mask hiding 5."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, size, size, generator=g)
    patches = math.ceil(size / patch) ** 2
    predictions = torch.randn(3, patches, patch * patch * 3, generator=g).requires_grad_()
    order = torch.rand(3, patches, generator=g).argsort(dim=1)
    keep, masked = order[:, : patches - 5].sort(1).values, order[:, patches - 5 :].sort(1).values
    views = Views(images=(images,), targets={"keep": keep, "masked": masked})
    return views, predictions, keep, masked


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size", [12, 10])  # 10 px: patches of 4 px over a padded 3 x 3 grid
def test_loss_equals_the_reference_formula(norm_pix: bool, size: int) -> None:
    views, predictions, _, masked = loss_inputs(size)
    loss = mae.MAELoss(norm_pix)(Outputs(predictions=(predictions,)), views, None).loss
    expected = reference_loss(views.images[0], predictions.detach(), masked, 4, norm_pix)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _pixels_of(images: Tensor, k: int, cols: int, patch: int) -> tuple[slice, slice]:
    row, col = divmod(k, cols)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_reads_only_the_hidden_patches(norm_pix: bool) -> None:
    views, predictions, keep, masked = loss_inputs()
    loss_fn = mae.MAELoss(norm_pix)

    def loss_of(images: Tensor, preds: Tensor) -> Tensor:
        changed = Views(images=(images,), targets=views.targets)
        return loss_fn(Outputs(predictions=(preds,)), changed, None).loss

    images = views.images[0]
    base = loss_of(images, predictions)
    base.backward()
    assert predictions.grad is not None
    for b in range(3):
        assert predictions.grad[b, keep[b]].abs().sum() == 0
        assert (predictions.grad[b, masked[b]].abs().sum(-1) > 0).all()

    visible_images, visible_preds = images.clone(), predictions.detach().clone()
    for b in range(3):
        for k in keep[b].tolist():
            rows, cols = _pixels_of(images, k, 3, 4)
            visible_images[b, :, rows, cols] = torch.randn(3, 4, 4)
        visible_preds[b, keep[b]] = 100.0
    assert loss_of(visible_images, predictions).item() == pytest.approx(base.item(), rel=1e-6)
    assert loss_of(images, visible_preds).item() == pytest.approx(base.item(), rel=1e-6)

    hidden_image, hidden_pred = images.clone(), predictions.detach().clone()
    rows, cols = _pixels_of(images, int(masked[1, 0]), 3, 4)
    hidden_image[1, 2, rows.start, cols.start] += 3.0
    hidden_pred[2, masked[2, -1], 5] += 1.0
    assert loss_of(hidden_image, predictions).item() != pytest.approx(base.item(), rel=1e-4)
    assert loss_of(images, hidden_pred).item() != pytest.approx(base.item(), rel=1e-4)


def test_a_mask_that_hides_nothing_is_refused() -> None:
    views, predictions, _, _ = loss_inputs()
    everything = torch.arange(9).expand(3, 9)
    views = Views(images=views.images, targets={"keep": everything, "masked": everything[:, :0]})
    with pytest.raises(ValueError, match="no patch of the 9 is hidden"):
        mae.MAELoss(True)(Outputs(predictions=(predictions,)), views, None)


def test_normalised_targets_have_zero_mean_and_unit_variance_per_patch() -> None:
    patches = mae.normalize_patches(mae.patchify(torch.rand(2, 3, 8, 8) * 5 + 2, 4))
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.var(-1), torch.ones(2, 4), atol=1e-3, rtol=0)


def test_unpatchify_inverts_patchify() -> None:
    images = torch.randn(2, 3, 16, 24)
    patches = mae.patchify(images, 4)
    assert patches.shape == (2, 4 * 6, 48)
    assert torch.equal(patches[1, 6 + 2], images[1, :, 4:8, 8:12].permute(1, 2, 0).flatten())
    assert torch.equal(mae.unpatchify(patches, (4, 6)), images)


# The encoder ---------------------------------------------------------------------------------


def encoder_and_views(mask_ratio: float = 0.75) -> tuple[mae.MAEEncoder, ViTBackbone, Views]:
    torch.manual_seed(0)
    backbone = vit()
    encoder = mae.MAEEncoder(backbone, backbone.embed_dim, mae.MAESettings())
    views = view_generator(backbone, 32, mask_ratio)(uint8_batch(4, 32))
    return encoder, backbone, views


def test_the_encoders_blocks_see_only_the_visible_patches_and_the_decoder_all() -> None:
    encoder, backbone, views = encoder_and_views()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            seen[name] = tuple(args[0].shape)

        return hook

    vit_blocks: Any = backbone.vit.blocks
    vit_blocks[0].register_forward_pre_hook(record("encoder"))
    encoder.decoder.blocks[0].register_forward_pre_hook(record("decoder"))
    outputs = encoder(views)
    assert seen["encoder"] == (4, 1 + 16, 128)  # the class token and 16 of 64 patches
    assert seen["decoder"] == (4, 1 + 64, 64)  # the class token and every patch
    assert outputs.predictions[0].shape == (4, 64, 4 * 4 * 3)


def test_the_prediction_does_not_depend_on_the_hidden_pixels() -> None:
    encoder, _, views = encoder_and_views()
    images = views.images[0]
    keep, masked = views.targets["keep"], views.targets["masked"]
    before = encoder(views).predictions[0]

    def changed(k: Tensor) -> Tensor:
        edited = images.clone()
        for b in range(4):
            rows, cols = _pixels_of(images, int(k[b, 0]), 8, 4)
            edited[b, :, rows, cols] = torch.randn(3, 4, 4)
        return encoder(Views(images=(edited,), targets=views.targets)).predictions[0]

    torch.testing.assert_close(changed(masked), before, rtol=0, atol=0)
    assert not torch.allclose(changed(keep), before)


def test_the_decoder_is_the_settings_and_the_mask_token_is_trained() -> None:
    encoder, _, views = encoder_and_views()
    settings = mae.MAESettings(decoder_depth=3, decoder_embed_dim=32, decoder_num_heads=2)
    encoder.decoder = mae.MAEDecoder(128, 48, settings)
    assert len(encoder.decoder.blocks) == 3
    assert encoder.decoder.blocks[0].attn.num_heads == 2
    outputs = encoder(views)
    mae.MAELoss(True)(outputs, views, None).loss.backward()
    assert encoder.decoder.mask_token.grad is not None
    assert encoder.decoder.mask_token.grad.abs().sum() > 0


def test_weight_decay_is_the_papers_whatever_the_optimisers_default() -> None:
    encoder, backbone, _ = encoder_and_views()
    optimization = Optimization(
        OptimSettings(weight_decay=1e-4), [encoder], 5, 10, [encoder.optim_rules()]
    )
    groups = {g["name"]: g for g in optimization.optimizer.param_groups}
    assert not groups["decay"]["params"] and not groups["no_decay"]["params"]
    assert groups["mae"]["weight_decay"] == 0.05
    assert groups["mae.no_decay"]["weight_decay"] == 0.0
    decayed = {id(p) for p in groups["mae"]["params"]}
    assert id(encoder.decoder.pred.weight) in decayed
    assert id(backbone.vit.blocks[0].attn.qkv.weight) in decayed  # type: ignore[index]
    assert id(encoder.decoder.pred.bias) not in decayed


# Assembled by the core -----------------------------------------------------------------------


def _build(registry: PluginRegistry, backbone: str, *choice: str) -> Any:
    config = load_config(None, [*choice, f"model.backbone={backbone}"], registry.settings_classes())
    net, dim = build_backbone(backbone, 32)
    return registry.build(config, RunContext(config=config, image_size=32, backbone=net), net, dim)


def test_mae_assembles_on_a_vit_and_registers_pixel_predictions(registry: PluginRegistry) -> None:
    parts = _build(registry, "vit_micro", "components.plugin=mae")
    assert [c.name for c in registry.capabilities_of("mae")] == ["pixel_predictions"]
    assert isinstance(parts.encoder, mae.MAEEncoder)
    views = parts.views(uint8_batch(2, 32))
    loss = parts.loss(parts.encoder(views), views, None).loss
    assert loss.ndim == 0 and math.isfinite(loss.item())


def test_a_backbone_without_tokens_is_refused_before_the_first_step_naming_mae(
    shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", "--plugin", "mae", "--backbone", "small", "--data", str(shapes_folder)]
    args += ["--epochs", "1", "--out", str(out), "--no-progress", "--set", "train.batch_size=16"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "plugin 'mae' cannot build its encoder" in error
    assert "MAE's encoder needs the patch tokens of a Vision Transformer" in error
    assert "SmallConvNet" in error and "vit_micro" in error and "timm:NAME" in error
    assert not (out / "last.pt").exists()


def test_maes_views_after_a_backbone_without_tokens_are_refused_naming_both(
    registry: PluginRegistry,
) -> None:
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "small", "components.plugin=simclr", "components.views=mae")
    message = str(info.value)
    assert "the views from plugin 'mae' requires patch_tokens" in message
    assert "--backbone small" in message


def test_maes_loss_after_an_encoder_without_pixels_is_refused_naming_both(
    registry: PluginRegistry,
) -> None:
    with pytest.raises(ComponentMismatchError) as info:
        _build(registry, "vit_micro", "components.plugin=simclr", "components.loss=mae")
    message = str(info.value)
    assert "the loss from plugin 'mae' requires" in message
    assert "patch_mask" in message and "pixel_predictions" in message
    assert "encoder from 'simclr'" in message


# Through the engine --------------------------------------------------------------------------


def _listener(logged: list[dict[str, float]]) -> types.ModuleType:
    @sslplug.hookimpl
    def sslplug_step_end(metrics: dict[str, float]) -> None:
        logged.append(dict(metrics))

    plugin = types.ModuleType("loss_listener")
    plugin.sslplug_step_end = sslplug_step_end  # type: ignore[attr-defined]
    return plugin


def test_short_run_lowers_the_loss_and_reports_the_knn(
    fast_args: list[str], tmp_path: Path, with_plugin: Any
) -> None:
    """Two epochs of 10 steps on the shapes folder (80 images, batches of 8)."""
    logged: list[dict[str, float]] = []
    args = [*fast_args, "--plugin", "mae", "--backbone", "vit_micro", "--no-progress"]
    torch.set_num_threads(1)  # the run's batches are small: one thread is faster than two
    with with_plugin(_listener(logged), "loss_listener"):
        assert main([*args, "--set", "train.batch_size=8"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["components"].values()) == {"mae", "none"}
    assert summary["backbone"] == "vit_micro"
    assert 0 <= summary["knn_top1"] <= 100
    losses = [m["loss"] for m in logged]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, f"the reconstruction error did not fall: {first:.4f} -> {last:.4f}"


def _three_epochs(shapes_folder: Path, out: Path, *extra: object) -> None:
    registry = PluginRegistry()
    registry.load_entry_points()
    for index, plugin in enumerate(extra):
        assert registry.register(plugin, f"extra{index}"), registry.failures
    config = load_config(
        None,
        [
            "components.plugin=mae",
            "model.backbone=vit_micro",
            f"data.name={shapes_folder}",
            "data.workers=0",
            "train.epochs=3",
            "train.max_steps_per_epoch=3",
            "train.batch_size=16",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "knn.every=0",
            "health.every=0",
            f"train.out={out}",
        ],
        registry.settings_classes(),
    )
    resume = out if (out / "last.pt").exists() else None
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit must reduce in the same order
    try:
        train(config, registry, resume=resume)
    finally:
        torch.set_num_threads(before)


def test_resume_is_bit_exact_masks_included(shapes_folder: Path, tmp_path: Path) -> None:
    """3 epochs x 3 steps straight, against a run stopped after epoch 2 and resumed: the masks
    of the third epoch are drawn again from the restored random state, so the weights agree."""
    _three_epochs(shapes_folder, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _three_epochs(shapes_folder, tmp_path / "resumed", StopAfterEpoch(2))
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 2
    _three_epochs(shapes_folder, tmp_path / "resumed")
    straight, resumed = (load_checkpoint(tmp_path / name) for name in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 9
    assert resumed["encoder"].keys() == straight["encoder"].keys()
    for key, value in straight["encoder"].items():
        assert torch.equal(resumed["encoder"][key], value), key


# Settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("mask_ratio=1.0", "mask_ratio must be above 0 and below 1 .*got 1.0"),
        ("mask_ratio=-0.1", "mask_ratio must be above 0 and below 1 .*got -0.1"),
        ("mask_ratio=0.0", "mask_ratio must be above 0 and below 1 .*got 0.0"),
        ("crop_scale=[0.5, 0.2]", r"crop_scale must be a range .*got \(0.5, 0.2\)"),
        ("decoder_depth=0", "decoder_depth must be greater than 0, got 0"),
        ("decoder_num_heads=0", "decoder_num_heads must be greater than 0, got 0"),
        ("decoder_embed_dim=30", "decoder_embed_dim 30 must be a multiple of 4 .*a multiple of 4"),
        ("decoder_num_heads=3", "decoder_embed_dim 64 must be .*heads 3: a multiple of 12"),
        ("weight_decay=-1", "weight_decay must be 0 or more, got -1"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(
    registry: PluginRegistry, setting: str, shown: str
) -> None:
    with pytest.raises(ConfigError, match=shown):
        load_config(None, ["components.plugin=mae", f"mae.{setting}"], registry.settings_classes())
