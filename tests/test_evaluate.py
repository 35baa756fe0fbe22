"""Label budgets, class-balanced subsets, the kNN and the linear probe."""

from __future__ import annotations

import pytest
import torch

from sslplug.data import Split
from sslplug.errors import ConfigError
from sslplug.evaluate import LabelBudget, knn_predict, label_subset, linear_probe, parse_labels
from sslplug.finetune import take


@pytest.mark.parametrize(
    ("text", "budget", "name"),
    [
        ("1%", LabelBudget(percent=1.0), "1%"),
        ("10%", LabelBudget(percent=10.0), "10%"),
        ("0.5%", LabelBudget(percent=0.5), "0.5%"),
        ("25", LabelBudget(per_class=25), "25/class"),
        ("all", LabelBudget(), "all"),
        ("100%", LabelBudget(), "all"),
    ],
)
def test_label_budgets_parse(text, budget, name):
    assert parse_labels(text) == budget
    assert budget.name == name


@pytest.mark.parametrize("text", ["0%", "150%", "-3", "0", "half", "1 %%", ""])
def test_bad_label_budget_names_the_value_and_what_is_valid(text):
    with pytest.raises(ConfigError, match=f"labels {text!r} is not a label budget; valid: a "):
        parse_labels(text)


def _labels(per_class: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]


def test_subset_is_class_balanced_seeded_and_nested():
    labels = _labels([500] * 10)
    one = label_subset(labels, parse_labels("1%"), 10, seed=0)
    ten = label_subset(labels, parse_labels("10%"), 10, seed=0)
    assert len(one) == 50 and len(ten) == 500
    assert len(set(one.tolist())) == 50
    assert torch.bincount(labels[one], minlength=10).tolist() == [5] * 10
    assert torch.bincount(labels[ten], minlength=10).tolist() == [50] * 10
    assert set(one.tolist()) <= set(ten.tolist())
    assert torch.equal(one, label_subset(labels, parse_labels("1%"), 10, seed=0))
    assert not torch.equal(one, label_subset(labels, parse_labels("1%"), 10, seed=1))
    assert torch.equal(label_subset(labels, parse_labels("all"), 10), torch.arange(5000))
    per_class = label_subset(labels, parse_labels("7"), 10, seed=0)
    assert torch.bincount(labels[per_class], minlength=10).tolist() == [7] * 10


def test_subset_larger_than_a_class_is_an_error():
    with pytest.raises(ConfigError, match="asks for 30 images of class 1, which has 20"):
        label_subset(_labels([40, 20]), parse_labels("30"), 2)


def test_subset_images_come_from_the_train_split_only():
    train = Split(labels=_labels([30] * 4), images=torch.zeros(120, 3, 8, 8, dtype=torch.uint8))
    test = Split(labels=_labels([5] * 4), images=torch.full((20, 3, 8, 8), 255, dtype=torch.uint8))
    index = label_subset(train.labels, parse_labels("10%"), 4)
    chosen = take(train, index)
    assert len(chosen) == 12 and bool((chosen.images == 0).all())
    assert torch.equal(chosen.labels, train.labels[index])
    assert not bool((chosen.images[:, None] == test.images[None]).flatten(2).all(2).any())


def _blobs(n: int, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 64, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.arange(n) % 10
    return centres[labels] + spread * torch.randn(n, 64, generator=generator), labels


def test_linear_probe_separates_separable_classes():
    x, y = _blobs(500, seed=1, spread=1.0)
    xt, yt = _blobs(1000, seed=2, spread=1.0)
    accuracy, weight_decay = linear_probe(x, y, xt, yt, 10)
    assert accuracy > 99.0
    assert weight_decay in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def test_linear_probe_is_at_chance_on_shuffled_labels():
    x, y = _blobs(1000, seed=1, spread=1.0)
    xt, yt = _blobs(2000, seed=2, spread=1.0)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    accuracy, _ = linear_probe(x, shuffled, xt, yt, 10)
    assert 5.0 < accuracy < 16.0


def test_knn_votes_for_the_nearest_class():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(bank, labels, queries, 2, k=1).tolist() == [0, 1]
