"""Optimizers, schedule, kNN, augmentation recipes and backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslplug.augment import MultiViewGenerator, byol_recipe, denormalize
from sslplug.config import OptimSettings
from sslplug.evaluate import knn_predict
from sslplug.nn import MLP, build_backbone, ema_update
from sslplug.optim import LARS, build_optimizer, warmup_cosine


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_each_optimizer_minimises_a_regression(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(256, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    lr = {"sgd": 0.05, "adamw": 0.01, "lars": 1.0}[name]
    opt = build_optimizer(OptimSettings(name=name, lr=lr, weight_decay=0.0), [model])
    start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * start


def test_biases_and_norms_get_no_weight_decay_and_no_lars_scaling():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(OptimSettings(name="lars", weight_decay=1e-4), [model])
    assert isinstance(opt, LARS)
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert no_decay["lars_exclude"] and not decay["lars_exclude"]


def test_knn_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    bank, labels, queries = (
        torch.randn(50, 6, generator=g),
        torch.randint(0, 3, (50,), generator=g),
        torch.randn(7, 6, generator=g),
    )
    predicted = knn_predict(bank, labels, queries, num_classes=3, k=5, temperature=0.5)
    for q, p in zip(queries, predicted):
        sims = torch.nn.functional.cosine_similarity(bank, q[None], dim=1)
        top = sims.topk(5).indices
        votes = [
            sum(float(torch.exp(sims[i] / 0.5)) for i in top if labels[i] == c) for c in range(3)
        ]
        assert int(p) == max(range(3), key=votes.__getitem__)


def test_knn_separates_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    labels = torch.arange(4).repeat(25)
    bank = centres[labels] + torch.randn(100, 4, generator=g)
    query_labels = torch.arange(4).repeat(5)
    queries = centres[query_labels] + torch.randn(20, 4, generator=g)
    assert torch.equal(knn_predict(bank, labels, queries, 4, k=10), query_labels)


def test_byol_recipe_draws_parameters_per_sample():
    torch.manual_seed(0)
    views = MultiViewGenerator(byol_recipe(32))(
        torch.full((64, 3, 32, 32), 128, dtype=torch.uint8).clone()
    )
    assert len(views.images) == 2 and views.images[0].shape == (64, 3, 32, 32)
    per_image_mean = denormalize(views.images[0]).mean(dim=(1, 2, 3))
    assert per_image_mean.std() > 0.01  # colour jitter differs between images of one batch


def test_view_generator_refuses_float_input():
    with pytest.raises(TypeError, match="uint8"):
        MultiViewGenerator(byol_recipe(8))(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize(("name", "dim"), [("small", 128), ("resnet18", 512)])
def test_backbones_map_images_to_pooled_features(name, dim):
    net, feature_dim = build_backbone(name, 32)
    assert feature_dim == dim
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_cifar_stem_for_small_images_only():
    small, _ = build_backbone("resnet18", 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large, _ = build_backbone("resnet18", 224)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_mlp_layers_and_ema_update():
    mlp = MLP(8, [16], 4)
    assert [type(m).__name__ for m in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    a, b = MLP(4, [4], 2), MLP(4, [4], 2)
    before = [p.clone() for p in a.parameters()]
    ema_update(a, b, tau=0.75)
    for old, new, online in zip(before, a.parameters(), b.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)
