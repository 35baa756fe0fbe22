"""Label-free measures of a representation, and the rule that calls it collapsed.

A run on unlabelled images has no kNN accuracy to watch. These measures need no labels:

* **effective rank** (RankMe, Garrido et al. 2023, Eq. 1): ``exp(-sum p_k log p_k)`` with
  ``p_k = s_k / sum(s) + eps`` over the singular values ``s_k`` of the ``(N, d)`` embedding
  matrix. 1 when every embedding lies on one line; up to ``min(N, d)``. The paper finds it
  tracks downstream accuracy within a method across hyper-parameters.
* **spread**: the standard deviation of each dimension of the l2-normalised embeddings,
  averaged over dimensions and multiplied by ``sqrt(d)``: 0 for a collapsed encoder (every
  image has the same embedding), about 1 when the embeddings spread over the sphere (each
  coordinate of a uniform unit vector has standard deviation ``1/sqrt(d)``; BYOL and SimSiam
  use the unscaled value as their collapse signal, Chen & He 2021, Fig. 2).
* the spread again, of fewer images (``quick_spread``), on every epoch between those: the
  collapse rule needs two epochs in a row.
* **alignment** and **uniformity** (Wang & Isola 2020, Eqs. 4-5, alpha = 2, t = 2) of the
  l2-normalised features of two augmented views of the same images: alignment, the mean
  squared distance between the two views of an image (0 to 4, lower is better); uniformity,
  ``log`` of the mean Gaussian potential over pairs of different images (from 0, everything
  in one point, down to about -4 here; lower is better).

The spread and the uniformity of fewer than two embeddings are undefined (no standard
deviation, no pair): they are ``None``, not measured, and left out of what is reported.

``collapse`` applies the rule the monitor warns on (``docs/health.md`` has the measurements it
was chosen from).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COLLAPSE_MIN_STEPS",
    "COLLAPSE_SPREAD",
    "HEALTH_MEASURES",
    "alignment",
    "collapse",
    "effective_rank",
    "spread",
    "uniformity",
]

# What the health monitor reports (``collapsed`` is 1 on an epoch the rule fired).
HEALTH_MEASURES = (
    "rank_features",
    "spread_features",
    "rank_projections",
    "spread_projections",
    "alignment",
    "uniformity",
    "health_seconds",
    "collapsed",
)

# Below this spread the embeddings are taken as collapsed: chosen from the measurements in
# docs/health.md (healthy runs stay far above it, runs made to collapse fall far below).
COLLAPSE_SPREAD = 0.05
RECOVERING = 1.2
# The monitor judges only after this many optimisation steps (two epochs of the default data
# take 38): in a handful of steps SimSiam's and NNCLR's projections were still at 0.04 while
# their full runs never came near 0.05 (docs/health.md).
COLLAPSE_MIN_STEPS = 30


def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe of ``(N, d)`` embeddings (Garrido et al. 2023, Eq. 1)."""
    singular = torch.linalg.svdvals(embeddings.double())
    if singular.sum() <= 0:
        return 1.0
    p = singular / singular.sum() + eps
    return math.exp(float(-(p * p.log()).sum()))


def spread(embeddings: Tensor) -> float | None:
    """Mean per-dimension standard deviation of the l2-normalised embeddings, times
    ``sqrt(d)``: 0 when collapsed, about 1 when spread over the sphere. ``None`` (not
    measured) for fewer than two embeddings, which have no standard deviation."""
    if len(embeddings) < 2:
        return None
    unit = F.normalize(embeddings.double(), dim=1)
    return float(unit.std(dim=0).mean() * math.sqrt(embeddings.shape[1]))


def alignment(first: Tensor, second: Tensor) -> float:
    """Mean squared distance between the l2-normalised features of two views of each image
    (Wang & Isola 2020, Eq. 4 with alpha = 2)."""
    a, b = F.normalize(first.double(), dim=1), F.normalize(second.double(), dim=1)
    return float((a - b).pow(2).sum(dim=1).mean())


def uniformity(features: Tensor, t: float = 2.0) -> float | None:
    """``log`` of the mean of ``exp(-t |x - y|^2)`` over pairs of different l2-normalised
    features (Wang & Isola 2020, Eq. 5). ``None`` (not measured) for fewer than two
    features, which make no pair."""
    if len(features) < 2:
        return None
    unit = F.normalize(features.double(), dim=1)
    distances = torch.pdist(unit).pow(2)
    return float(torch.logsumexp(-t * distances, dim=0) - math.log(len(distances)))


def collapse(
    measures: dict[str, float], previous: dict[str, float] | None
) -> tuple[str, float] | None:
    """The measure that says the embeddings collapsed, with its value, or ``None``.

    The rule: the spread of the backbone features, or of the projections where the encoder
    has them, is below ``COLLAPSE_SPREAD`` (nearly every image gets the same direction) after
    this epoch and after the one before (``previous``), and is not recovering (not above
    ``RECOVERING`` times its previous value). A projector's outputs may point alike for a
    while at the start of training and then spread out (MoCo v3's went from 0.024 to 0.035 in
    its first steps, docs/health.md); a collapsed run stays down.
    """
    if not previous:
        return None
    for name in ("spread_features", "spread_projections"):
        value, before = measures.get(name), previous.get(name)
        if value is None or before is None:
            continue
        if value < COLLAPSE_SPREAD and before < COLLAPSE_SPREAD and value <= RECOVERING * before:
            return name, value
    return None
