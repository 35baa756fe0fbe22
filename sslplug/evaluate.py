"""Evaluation of frozen features: weighted k-nearest-neighbour classification.

The kNN monitor of Wu et al. 2018 (Section 3.4), as solo-learn and lightly use it: features of
the train split are the memory bank, features of the test split are the queries, both L2
normalised; each of the ``k`` nearest neighbours (cosine similarity ``s``) votes for its class
with weight ``exp(s / temperature)``, and the class with the largest total wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslplug.augment import normalize, to_float
from sslplug.components import Encoder
from sslplug.data import Loader, Split

__all__ = ["extract_features", "knn_accuracy", "knn_predict"]


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
