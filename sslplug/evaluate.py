"""Evaluation of frozen features: weighted kNN, the linear probe, and label subsets.

kNN is the monitor of Wu et al. 2018 (Section 3.4), as solo-learn and lightly use it: features
of the (labelled) train split are the memory bank, features of the test split are the queries,
both L2 normalised; each of the ``k`` nearest neighbours (cosine similarity ``s``) votes for its
class with weight ``exp(s / temperature)``, and the class with the largest total wins.

The linear probe is multinomial logistic regression on frozen, standardised features, fitted by
full-batch L-BFGS with an L2 penalty chosen on a held-out fifth of the labelled images: the
protocol of Kornblith et al. 2019 that SimCLR uses for its transfer results (Chen et al. 2020,
Appendix B.5). Full-batch L-BFGS needs no learning rate or epoch budget, and is deterministic.

A label budget (``1%``, ``10%``, ``25`` per class, ``all``) selects a class-balanced, seeded
subset of the train split: the same number of images from every class, drawn by a seeded
permutation, so that the 1% subset of a seed lies inside its 10% subset.
"""

from __future__ import annotations

import math
import re

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslplug.augment import normalize, to_float
from sslplug.components import Encoder
from sslplug.data import Loader, Split
from sslplug.errors import ConfigError

__all__ = [
    "PROBE_WEIGHT_DECAYS",
    "LabelBudget",
    "Probe",
    "extract_features",
    "fit_probe",
    "knn_accuracy",
    "knn_predict",
    "label_subset",
    "linear_probe",
    "parse_labels",
]

# up to 1: with a grid ending at 1e-2, that top value was chosen for most methods at 1% and
# 10% of CIFAR-10's labels, so the best penalty lay outside the grid
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def extract_features(
    encoder: Encoder, split: Split, device: torch.device, batch_size: int = 512, workers: int = 2
) -> tuple[Tensor, Tensor]:
    """``encoder.features`` of every image of ``split`` (un-augmented, normalised), and labels."""
    was_training = encoder.training
    encoder.eval()
    loader = Loader(split, batch_size, device, shuffle=False, drop_last=False, workers=workers)
    features, labels = [], []
    for images, lab in loader.epoch(0):
        features.append(encoder.features(normalize(to_float(images))).float())
        labels.append(lab)
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class of every query by weighted kNN against the memory bank."""
    bank = F.normalize(train_features, dim=1)
    k = min(k, len(bank))
    predictions = []
    for queries in F.normalize(query_features, dim=1).split(chunk):
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(queries), num_classes, device=queries.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    encoder: Encoder,
    train: Split,
    test: Split,
    num_classes: int,
    device: torch.device,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 kNN accuracy in percent of ``encoder.features`` on ``test``, memory bank ``train``."""
    train_features, train_labels = extract_features(encoder, train, device)
    test_features, test_labels = extract_features(encoder, test, device)
    predicted = knn_predict(
        train_features, train_labels, test_features, num_classes, k, temperature
    )
    return 100.0 * (predicted == test_labels).float().mean().item()


@attrs.frozen
class LabelBudget:
    """How many labelled train images to use: a percentage, a count per class, or all."""

    percent: float | None = None
    per_class: int | None = None

    @property
    def name(self) -> str:
        if self.per_class is not None:
            return f"{self.per_class}/class"
        if self.percent is None:
            return "all"
        return f"{self.percent:g}%"

    def count_per_class(self, total: int, num_classes: int) -> int | None:
        """Images per class; ``None`` means every labelled image."""
        if self.per_class is not None:
            return self.per_class
        if self.percent is None:
            return None
        return max(1, round(self.percent / 100 * total / num_classes))


def parse_labels(text: str) -> LabelBudget:
    """``"1%"``, ``"10%"``, ``"0.5%"``, ``"25"`` (images per class) or ``"all"``."""
    value = text.strip().lower()
    if value in ("all", "100%"):
        return LabelBudget()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if match and 0 < float(match[1]) <= 100:
        return LabelBudget(percent=float(match[1]))
    if value.isdigit() and int(value) > 0:
        return LabelBudget(per_class=int(value))
    raise ConfigError(
        f"labels {text!r} is not a label budget; valid: a percentage in (0, 100] such as 1% or "
        f"10%, a number of images per class such as 25, or all"
    )


def label_subset(labels: Tensor, budget: LabelBudget, num_classes: int, seed: int = 0) -> Tensor:
    """Indices (into ``labels``, the train split) of a class-balanced, seeded subset.

    Every class gives the same number of images, drawn by one seeded permutation per class, so
    a smaller budget of a seed is a subset of a larger one. Raises ``ConfigError`` when a class
    has fewer images than the budget asks of each.
    """
    labels = labels.cpu()
    per_class = budget.count_per_class(len(labels), num_classes)
    if per_class is None:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ConfigError(
                f"labels {budget.name} asks for {per_class} images of class {c}, which has "
                f"{len(members)}; use a smaller budget"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


@attrs.define
class Probe:
    """A linear probe: standardise with the train ``mean`` and ``std``, then ``head``."""

    head: nn.Linear
    mean: Tensor
    std: Tensor
    weight_decay: float

    def __call__(self, features: Tensor) -> Tensor:
        return self.head((features.float() - self.mean) / self.std)


def fit_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
) -> Probe:
    """Logistic regression on frozen features, with the L2 penalty chosen.

    Features are standardised with the train mean and deviation. The L2 penalty is the one of
    ``weight_decays`` that scores best on a seeded fifth of the train features held out, after
    which the classifier is refitted on all of them.
    """
    mean = train_features.float().mean(0, keepdim=True)
    std = train_features.float().std(0, keepdim=True).clamp_min(1e-6)
    x_train = (train_features.float() - mean) / std
    if len(weight_decays) > 1:
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        held = max(1, math.ceil(len(order) / 5))
        val, fit = order[:held].to(x_train.device), order[held:].to(x_train.device)
        scores = []
        for wd in weight_decays:
            head = _fit_logistic(x_train[fit], train_labels[fit], num_classes, wd)
            with torch.no_grad():
                scores.append((head(x_train[val]).argmax(1) == train_labels[val]).float().mean())
        best = weight_decays[int(torch.stack(scores).argmax())]
    else:
        best = weight_decays[0]
    return Probe(_fit_logistic(x_train, train_labels, num_classes, best), mean, std, best)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
) -> tuple[float, float]:
    """Test top-1 (percent) of ``fit_probe``'s classifier, and the penalty it chose."""
    probe = fit_probe(train_features, train_labels, num_classes, weight_decays, seed)
    with torch.no_grad():
        accuracy = (probe(test_features).argmax(1) == test_labels).float().mean().item()
    return 100.0 * accuracy, probe.weight_decay
