"""SimSiam: the loss against eq. 4 written out, the stop-gradient, the heads of the CIFAR
recipe, the predictor's fixed learning rate, a short run, settings and mixes."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from sslplug_methods import simsiam
from torch import nn

import sslplug
from sslplug import Outputs, Views
from sslplug.checkpoint import load_checkpoint
from sslplug.config import OptimSettings, RunConfig, RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError, ConfigError
from sslplug.nn import SmallConvNet, build_backbone
from sslplug.optim import Optimization

from .harness import StopAfterEpoch


def reference_loss(p1, p2, z1, z2):
    """Chen & He 2021, eq. 1 and 4: D(p, z) = -p/|p| . z/|z|, L = D(p1, z2)/2 + D(p2, z1)/2."""

    def d(p, z):
        total = 0.0
        for a, b in zip(p.tolist(), z.tolist()):
            na = math.sqrt(sum(x * x for x in a))
            nb = math.sqrt(sum(x * x for x in b))
            total -= sum(x * y for x, y in zip(a, b)) / (na * nb)
        return total / len(p)

    return d(p1, z2) / 2 + d(p2, z1) / 2


def _views(n=6):
    return Views(images=(torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)))


def _outputs(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p1, p2, z1, z2 = (torch.randn(n, d, generator=g).requires_grad_() for _ in range(4))
    return Outputs(projections=(z1, z2), predictions=(p1, p2))


def test_loss_matches_eq_4_and_stops_the_gradient_on_the_projections():
    outputs = _outputs()
    loss, metrics = simsiam.SimSiamLoss()(outputs, _views(), None)
    assert loss.item() == pytest.approx(reference_loss(*outputs.predictions, *outputs.projections))
    assert -1.0 <= loss.item() <= 1.0
    loss.backward()
    z1, z2 = outputs.projections
    p1, p2 = outputs.predictions
    assert z1.grad is None and z2.grad is None  # stop-gradient: z is a constant of the loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (p1, p2))
    assert 0 < metrics["std"].item() <= 1.0


def test_loss_is_minus_one_when_predictions_point_at_the_other_views_projections():
    outputs = _outputs()
    z1, z2 = outputs.projections
    aligned = Outputs(projections=(z1, z2), predictions=(3 * z2.detach(), 0.5 * z1.detach()))
    loss, _ = simsiam.SimSiamLoss()(aligned, _views(), None)
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)


def test_collapsed_outputs_have_zero_std():
    z = torch.ones(6, 5)
    collapsed = Outputs(projections=(z, z), predictions=(z, z))
    _, metrics = simsiam.SimSiamLoss()(collapsed, _views(), None)
    assert metrics["std"].item() == pytest.approx(0.0, abs=1e-7)


def _encoder(**settings) -> simsiam.SimSiamEncoder:
    backbone = SmallConvNet(width=4)  # 32 features
    return simsiam.SimSiamEncoder(backbone, backbone.out_dim, simsiam.SimSiamSettings(**settings))


def _layers(mlp: nn.Module) -> list[str]:
    return [type(m).__name__ for m in mlp]


def test_cifar_projector_has_two_layers_with_batch_norm_on_each_and_a_bottleneck_predictor():
    encoder = _encoder()
    assert _layers(encoder.projector) == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"
    ]  # fmt: skip
    assert encoder.projection_dim == 4 * 32 == encoder.projector[3].out_features
    assert encoder.projector[-1].affine is False  # the output BN, as the official code
    assert _layers(encoder.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert encoder.predictor[0].out_features == encoder.projection_dim // 4
    out = encoder(Views(images=(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))))
    assert [z.shape for z in out.projections] == [(4, 128), (4, 128)]
    assert [p.shape for p in out.predictions] == [(4, 128), (4, 128)]


def test_imagenet_projector_has_three_layers():
    encoder = _encoder(projector_layers=3, projection_dim=64, predictor_hidden_dim=8)
    linears = [m for m in encoder.projector if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [64, 64, 64]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in encoder.projector) == 3
    assert encoder.predictor[0].out_features == 8


def test_the_predictor_keeps_its_learning_rate_while_the_rest_decays():
    encoder = _encoder()
    settings = OptimSettings(lr=0.05, warmup_epochs=0.0)
    optimization = Optimization(settings, [encoder], 5, 20, [encoder.optim_rules()])
    groups = {g["name"]: g for g in optimization.optimizer.param_groups}
    predictor = {id(p) for p in encoder.predictor.parameters()}
    assert {id(p) for p in groups["predictor"]["params"]} | {
        id(p) for p in groups["predictor.no_decay"]["params"]
    } == predictor
    assert not predictor & {id(p) for p in groups["decay"]["params"]}
    for step in range(20):
        optimization.zero_grad()
        encoder(Views(images=(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)))).predictions[
            0
        ].sum().backward()
        optimization.step(step)
        assert groups["predictor"]["lr"] == groups["predictor.no_decay"]["lr"] == 0.05
    assert groups["decay"]["lr"] < 0.001  # the cosine reached its end
    # without the rule the predictor decays with everything else
    assert _encoder(fix_predictor_lr=False).optim_rules() is None


# through the engine ---------------------------------------------------------------------------


def _listening(registry) -> list[dict[str, float]]:
    """The metrics of every step of the next run with ``registry``."""
    seen: list[dict[str, float]] = []

    @sslplug.hookimpl
    def sslplug_step_end(metrics: dict[str, float]) -> None:
        seen.append(dict(metrics))

    plugin = types.ModuleType("metrics_listener")
    plugin.sslplug_step_end = sslplug_step_end  # type: ignore[attr-defined]
    registry.register(plugin, "metrics_listener")
    return seen


def _run(registry, out: Path, *assignments: str, steps: int = 12) -> dict:
    config = load_config(
        assignments=[
            *assignments,
            "train.epochs=1",
            f"train.max_steps_per_epoch={steps}",
            "train.batch_size=64",
            "train.log_every=1",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "knn.every=0",
            "health.every=0",
            "optim.warmup_epochs=0",
            "data.workers=0",
            f"train.out={out}",
        ],
        plugin_settings=registry.settings_classes(),
    )
    return train(config, registry)


@pytest.mark.slow  # 12 steps on the default data
def test_short_run_lowers_the_loss_with_the_predictor_lr_fixed(registry, tmp_path):
    metrics = _listening(registry)
    summary = _run(registry, tmp_path / "run", "components.plugin=simsiam")
    assert set(summary["components"].values()) == {"simsiam", "none"}
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, f"the loss did not fall: {first:.4f} -> {last:.4f}"
    assert all(m["std"] > 0.01 for m in metrics)  # not collapsed
    lr = load_config(assignments=[], plugin_settings=registry.settings_classes()).optim.lr
    groups = {g["name"]: g["lr"] for g in load_checkpoint(tmp_path / "run")["optimizer"][
        "param_groups"
    ]}  # fmt: skip
    assert groups["predictor"] == groups["predictor.no_decay"] == lr
    assert groups["decay"] < lr / 10  # the rest followed the cosine to its end


@pytest.mark.slow  # 6 steps on the default data
def test_simsiam_mixes_with_another_plugins_augmentation(registry, tmp_path):
    metrics = _listening(registry)
    summary = _run(
        registry,
        tmp_path / "run",
        "components.plugin=simsiam",
        "components.augmentation=byol",
        steps=6,
    )
    assert summary["components"]["augmentation"] == "byol"
    assert summary["components"]["encoder"] == "simsiam"
    assert len(metrics) == 6 and all(math.isfinite(m["loss"]) for m in metrics)


def test_the_loss_after_an_encoder_without_a_predictor_is_refused_naming_both(registry):
    config = load_config(
        assignments=["components.plugin=simclr", "components.loss=simsiam"],
        plugin_settings=registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", 32)
    with pytest.raises(ComponentMismatchError) as info:
        registry.build(config, RunContext(config=config, image_size=32), backbone, dim)
    message = str(info.value)
    assert "'simsiam' requires prediction" in message and "'simclr'" in message


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("projector_layers", "4", "must be 2"),
        ("projection_dim", "-1", "must be 0 or more"),
        ("predictor_hidden_dim", "-3", "must be 0 or more"),
        ("crop_scale", "[0.5, 0.2]", "must be a range"),
        ("jitter_prob", "1.5", "must be between 0 and 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(registry, setting, value, words):
    with pytest.raises(ConfigError, match=rf"{setting} {words}.*got"):
        load_config(
            assignments=["components.plugin=simsiam", f"simsiam.{setting}={value}"],
            plugin_settings=registry.settings_classes(),
        )


def _three_epochs(registry, out: Path) -> RunConfig:
    return load_config(
        assignments=[
            "components.plugin=simsiam",
            "simsiam.projection_dim=64",
            "train.epochs=3",
            "train.max_steps_per_epoch=3",
            "train.batch_size=32",
            'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "knn.every=0",
            "health.every=0",
            "data.workers=0",
            f"train.out={out}",
        ],
        plugin_settings=registry.settings_classes(),
    )


@pytest.mark.slow  # three short runs on the default data
def test_resume_is_bit_exact_with_the_predictor_group(tmp_path):
    """3 epochs x 3 steps straight, against a run stopped after epoch 2 and resumed: the same
    tensors, and the predictor's group still at its fixed learning rate."""
    from sslplug.plugins import PluginRegistry

    def fresh(*extra: object) -> PluginRegistry:
        registry = PluginRegistry()
        registry.load_entry_points()
        for index, plugin in enumerate(extra):
            assert registry.register(plugin, f"extra{index}"), registry.failures
        return registry

    torch.set_num_threads(1)  # runs compared bit for bit must reduce in the same order
    registry = fresh()
    train(_three_epochs(registry, tmp_path / "straight"), registry)
    registry = fresh(StopAfterEpoch(2))
    with pytest.raises(KeyboardInterrupt):
        train(_three_epochs(registry, tmp_path / "resumed"), registry)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 2
    registry = fresh()
    config = _three_epochs(registry, tmp_path / "resumed")
    train(config, registry, resume=tmp_path / "resumed")

    straight, resumed = (load_checkpoint(tmp_path / name) for name in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 9
    for component in ("views", "encoder", "loss"):
        assert resumed[component].keys() == straight[component].keys(), component
        for key, value in straight[component].items():
            assert torch.equal(resumed[component][key], value), f"{component}.{key}"
    lrs = {g["name"]: g["lr"] for g in resumed["optimizer"]["param_groups"]}
    assert lrs["predictor"] == config.optim.lr
