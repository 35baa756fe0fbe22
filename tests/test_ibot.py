"""iBOT and DINOv2: the patch loss and the whole loss against loops written out here, the
centres (iBOT's over every patch, DINOv2's over the masked ones), Sinkhorn-Knopp centring, the
student's masks and the teacher's unmasked views, register tokens, and the refusals.

The methods' runs (two steps, bit-exact resume, export, DINO's augmentation) are in
tests/test_method_contract.py."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sslplug_methods import dinov2, ibot
from torch import Tensor

import sslplug
from sslplug.cli import main
from sslplug.config import RunContext
from sslplug.errors import ConfigError
from sslplug.nn import build_backbone

from .harness import train_pinned

SIZE, BATCH, K = 32, 4, 16


def reference_patch_loss(teacher: Tensor, student: Tensor, mask: Tensor, temp: float) -> float:
    """iBOT's patch loss of one crop, one image and one patch at a time: the mean over images of
    the mean over each image's masked patches of the cross-entropy; 0 for an unmasked image."""
    rows = iter(range(teacher.shape[0]))
    per_image = []
    for b in range(mask.shape[0]):
        total, count = 0.0, 0
        for n in range(mask.shape[1]):
            if not mask[b, n]:
                continue
            r = next(rows)
            logits = [float(x) / temp for x in student[r]]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            total -= sum(float(t) * (x - log_z) for t, x in zip(teacher[r], logits, strict=True))
            count += 1
        per_image.append(total / count if count else 0.0)
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("temp", [0.1, 0.5])
def test_patch_loss_matches_the_loop(temp: float) -> None:
    torch.manual_seed(0)
    mask = torch.rand(BATCH, 9) < 0.4
    mask[1] = False  # an image without masked patches adds 0
    m = int(mask.sum())
    teacher = F.softmax(torch.randn(m, K), dim=-1)
    student = torch.randn(m, K)
    got = ibot.masked_patch_cross_entropy(teacher, student, mask, temp)
    assert got.item() == pytest.approx(reference_patch_loss(teacher, student, mask, temp), rel=1e-5)


def test_patch_loss_with_nothing_masked_is_zero() -> None:
    mask = torch.zeros(BATCH, 9, dtype=torch.bool)
    empty = torch.zeros(0, K)
    assert ibot.masked_patch_cross_entropy(empty, empty, mask, 0.1).item() == 0.0


def _settings(cls: type = ibot.IBOTSettings, **changes: object) -> ibot.IBOTSettings:
    base = {"out_dim": K, "hidden_dim": 32, "bottleneck_dim": 8, "local_crops_number": 2}
    return cls(**{**base, **changes})


def _run(epoch_float: float = 0.0) -> RunContext:
    run = types.SimpleNamespace(progress=types.SimpleNamespace(epoch_float=epoch_float))
    return run  # type: ignore[return-value]


def _encoder(settings: ibot.IBOTSettings, registers: int = 0) -> ibot.MaskedTokenEncoder:
    backbone, width = build_backbone("vit_micro", SIZE, registers=registers)
    return ibot.MaskedTokenEncoder(backbone, width, settings, "iBOT's encoder")


def _views() -> sslplug.Views:
    g = [torch.rand(BATCH, 3, SIZE, SIZE) for _ in range(2)]
    local = [torch.rand(BATCH, 3, 16, 16) for _ in range(2)]
    return sslplug.Views(images=[*g, *local], groups=("global",) * 2 + ("local",) * 2)


def test_student_masks_the_global_crops_only_and_the_teacher_nothing() -> None:
    torch.manual_seed(0)
    settings = _settings(mask_probability=1.0)
    encoder = _encoder(settings).train()
    views = _views()
    out = encoder(views)
    masks = out.extras["masks"]
    assert len(masks) == 2 and all(m.shape == (BATCH, 64) for m in masks)
    assert all(bool(m.any(dim=1).all()) for m in masks)  # every image masked at probability 1
    assert out.extras["masked_patch_logits"].shape == (int(masks.sum()), K)
    assert [p.shape for p in out.projections] == [(BATCH, K)] * 4
    assert [t.shape for t in out.extras["class_tokens"]] == [(BATCH, 128)] * 2

    teacher = ibot.teacher(encoder, settings)
    target = teacher(views.select(("global",)))
    assert "masks" not in target.extras
    assert [p.shape for p in target.extras["patch_logits"]] == [(BATCH, 64, K)] * 2
    # the teacher sees the crops whole: its class tokens are those of the unmasked images
    plain = encoder.eval().vit.tokens(views.images[0])[0][:, 0]
    torch.testing.assert_close(teacher.network.vit.tokens(views.images[0])[0][:, 0], plain)


def test_masked_positions_hold_the_mask_token_in_the_student() -> None:
    torch.manual_seed(0)
    settings = _settings(mask_probability=1.0)
    encoder = _encoder(settings).train()
    with torch.no_grad():
        encoder.vit.mask_token.normal_()  # type: ignore[union-attr]
    views = _views()
    torch.manual_seed(1)
    out = encoder(views)
    torch.manual_seed(1)
    masks = encoder.masks(views, (0, 1))
    assert all(torch.equal(masks[i], out.extras["masks"][i]) for i in (0, 1))
    prefix, _ = encoder.vit.tokens(views.images[0], mask=masks[0])
    torch.testing.assert_close(out.extras["class_tokens"][0], prefix[:, 0])
    unmasked = encoder.vit.tokens(views.images[0])[0][:, 0]
    assert not torch.allclose(prefix[:, 0], unmasked)


def _reference_total(
    loss: ibot.IBOTLoss, outputs: sslplug.Outputs, target: sslplug.Outputs
) -> float:
    """The whole loss written out: DINO's eq. 3 with centring, the patch loop, KoLeo by loop."""
    s = loss.settings
    cls_temp, patch_temp = loss.temperatures()
    teacher = [F.softmax((t - loss.center) / cls_temp, dim=-1) for t in target.projections]
    pairs = []
    for u, t in enumerate(teacher):
        for v, z in enumerate(outputs.projections):
            if u != v:
                log_s = F.log_softmax(z.detach() / s.student_temp, dim=-1)
                pairs.append(-(t * log_s).sum(-1).mean())
    cls_loss = float(torch.stack(pairs).mean())
    patch = []
    masks = outputs.extras["masks"]
    students = outputs.extras["masked_patch_logits"].split(masks.flatten(1).sum(1).tolist())
    for mask, student, every in zip(masks, students, target.extras["patch_logits"], strict=True):
        t = F.softmax((every[mask] - loss.patch_center) / patch_temp, dim=-1)
        patch.append(reference_patch_loss(t, student.detach(), mask, s.student_temp))
    koleo = 0.0
    for tokens in outputs.extras["class_tokens"]:
        z = F.normalize(tokens.detach(), dim=1)
        nearest = [
            min(float((z[i] - z[j]).norm()) for j in range(len(z)) if j != i) for i in range(len(z))
        ]
        koleo += -sum(math.log(d) for d in nearest) / len(z)
    return s.lambda1 * cls_loss + s.lambda2 * sum(patch) / len(patch) + s.koleo_weight * koleo


@pytest.mark.parametrize("cls", [ibot.IBOTSettings, dinov2.DINOv2Settings])
def test_whole_loss_matches_the_formulas_written_out(cls: type) -> None:
    torch.manual_seed(0)
    settings = _settings(cls, mask_probability=1.0, lambda2=0.7)
    encoder = _encoder(settings).train()
    views = _views()
    outputs = encoder(views)
    target = ibot.teacher(encoder, settings)(views.select(("global",)))
    loss = (dinov2.DINOv2Loss if cls is dinov2.DINOv2Settings else ibot.IBOTLoss)(
        settings, _run(2.0), encoder
    )
    loss.center.normal_()
    loss.patch_center.normal_()
    result = loss(outputs, views, target)
    assert result.loss.item() == pytest.approx(_reference_total(loss, outputs, target), rel=1e-4)
    assert result.metrics["koleo"] > 0 and result.metrics["masked"] > 0
    result.loss.backward()
    assert encoder.vit.mask_token.grad is not None  # type: ignore[union-attr]


def test_centres_follow_the_teacher_every_patch_for_ibot_the_masked_ones_for_dinov2() -> None:
    torch.manual_seed(0)
    settings = _settings(mask_probability=1.0)
    encoder = _encoder(settings).train()
    views = _views()
    outputs = encoder(views)
    target = ibot.teacher(encoder, settings)(views.select(("global",)))
    m = settings.center_momentum
    every = torch.cat([p.flatten(0, 1) for p in target.extras["patch_logits"]])
    masked = torch.cat(
        [p[k] for p, k in zip(target.extras["patch_logits"], outputs.extras["masks"], strict=True)]
    )
    cls_mean = torch.stack(target.projections).flatten(0, 1).mean(0, keepdim=True)
    for kind, rows in ((ibot.IBOTLoss, every), (dinov2.DINOv2Loss, masked)):
        loss = kind(settings, _run(), encoder)
        loss.update_from_step(outputs, views, target)
        torch.testing.assert_close(loss.center, (1 - m) * cls_mean)
        torch.testing.assert_close(loss.patch_center, (1 - m) * rows.mean(0, keepdim=True))
    still = ibot.IBOTLoss(_settings(centering="sinkhorn_knopp"), _run(), encoder)
    still.update_from_step(outputs, views, target)
    assert still.center.abs().sum() == 0 and still.patch_center.abs().sum() == 0


def test_sinkhorn_centring_gives_the_teachers_balanced_assignments() -> None:
    torch.manual_seed(0)
    settings = _settings(centering="sinkhorn_knopp")
    loss = ibot.IBOTLoss(settings, _run(10.0), _encoder(settings))
    logits = torch.randn(64, K)
    got = loss.distribution(logits, loss.center, 0.07)
    torch.testing.assert_close(got, sslplug.sinkhorn_knopp(logits, 0.07))
    torch.testing.assert_close(got.sum(dim=1), torch.ones(64))


def test_teacher_temperatures_warm_up_over_the_same_epochs() -> None:
    settings = _settings(warmup_teacher_temp_epochs=4.0, teacher_patch_temp=0.09)
    loss = ibot.IBOTLoss(settings, _run(2.0), _encoder(settings))
    assert loss.temperatures() == pytest.approx((0.055, 0.065))


def test_registers_sit_between_the_class_token_and_the_patches() -> None:
    settings = _settings()
    encoder = _encoder(settings, registers=4)
    assert encoder.vit.num_prefix_tokens == 5
    prefix, patches = encoder.vit.tokens(torch.rand(2, 3, SIZE, SIZE))
    assert prefix.shape == (2, 5, 128) and patches.shape == (2, 64, 128)
    assert encoder.vit.timm_args["reg_tokens"] == 4


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [
        ("small", False, "model.registers=4: register tokens belong to Vision Transformers"),
        ("vit_micro", True, "model.registers=4 with model.pretrained=true"),
    ],
)
def test_registers_where_they_cannot_go_are_refused(name: str, pretrained: bool, message: str):
    with pytest.raises(ConfigError, match=message):
        build_backbone(name, SIZE, registers=4, published=pretrained)


def test_dinov2_on_a_resnet_is_refused_naming_plugin_and_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", "--plugin", "dinov2", "--backbone", "resnet18", "--out", str(out)]
    assert main([*args, "--epochs", "1", "--disable", "progress"]) == 2
    error = capsys.readouterr().err
    assert "plugin 'dinov2' cannot build its encoder" in error
    assert "DINOv2's encoder needs the patch tokens of a Vision Transformer" in error
    assert "ResNet" in error and "vit_micro" in error
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("dinov2.centering=softmax", "softmax"),
        ("ibot.mask_ratio=[0.5, 0.1]", "mask_ratio"),
        ("ibot.mask_probability=1.5", "mask_probability"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(
    setting: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plugin = setting.split(".")[0]
    args = ["run", "--plugin", plugin, "--backbone", "vit_micro", "--set", setting]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


SHORT = [
    "train.batch_size=8",
    "train.epochs=1",
    "train.max_steps_per_epoch=1",
    "train.disable=['progress','knn','health','view_grid','tensorboard']",
    "data.workers=0",
    "knn.baseline=false",
    "health.baseline=false",
    "model.backbone=vit_micro",
    "ibot.out_dim=64",
    "ibot.local_crops_number=2",
    "dinov2.out_dim=64",
    "dinov2.local_crops_number=2",
]


@pytest.mark.slow  # a short run
def test_the_ibot_loss_mixes_with_dinos_augmentation_and_the_dinov2_encoder(tmp_path: Path):
    mixed = train_pinned(
        tmp_path / "mixed",
        [
            *SHORT,
            "components.plugin=dinov2",
            "components.loss=ibot",
            "components.augmentation=dino",
        ],
    )
    assert mixed["components"]["loss"] == "ibot"
    assert mixed["components"]["augmentation"] == "dino"
    assert math.isfinite(mixed["final_loss"])


@pytest.mark.slow  # a short run and an export
def test_a_run_with_registers_exports_and_loads_as_a_teacher_with_them(tmp_path: Path):
    run = tmp_path / "run"
    train_pinned(run, [*SHORT, "components.plugin=dinov2", "model.registers=2"])
    exported = tmp_path / "backbone.pt"
    assert main(["export", str(run), str(exported)]) == 0
    for source in (run, exported):  # the run's settings, the export's note
        teacher = sslplug.pretrained_backbone(str(source))
        vit = teacher.module
        assert isinstance(vit, sslplug.ViTBackbone) and vit.num_prefix_tokens == 3
        state = torch.load(exported, weights_only=True)
        torch.testing.assert_close(vit.vit.state_dict()["reg_token"], state["reg_token"])
