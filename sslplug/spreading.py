"""What keeps a batch spread out: the KoLeo regulariser and Sinkhorn-Knopp equipartition.

Both act on the batch as a whole, not on one image at a time, and both are parts of DINOv2
(Oquab et al. 2023, arXiv:2304.07193, Section 4): KoLeo spreads the class tokens of a batch
over the sphere, Sinkhorn-Knopp spreads a batch's assignments evenly over the prototypes
(SwAV's codes, DINOv2's teacher centring). The official code read for both is
facebookresearch/dinov2 at commit b8931f7 (``dinov2/loss/koleo_loss.py`` and
``sinkhorn_knopp_teacher`` in ``dinov2/loss/dino_clstoken_loss.py``) and facebookresearch/swav
at commit 06b1b7c (``distributed_sinkhorn`` in ``main_swav.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslplug.distributed import all_reduce_sum, world_size


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko entropy regulariser of the rows of ``x`` ``(n, d)``, in fp32.

    Sablayrolles et al. 2019, "Spreading vectors for similarity search", arXiv:1806.03198,
    eq. 4, as DINOv2 uses it (Oquab et al. 2023, Section 4)::

        L = -1/n sum_i log(d_i),   d_i = min over j != i of |x_i - x_j|

    on the L2-normalised rows (``x`` need not be normalised: it is normalised here, with ``eps``
    guarding a zero row). Minimising ``L`` pushes every vector away from its nearest
    neighbour, which spreads the batch evenly over the sphere.

    It never returns NaN or inf, where the official code can:

    - fewer than two rows: no vector has a neighbour, and the loss is 0 (with a zero gradient,
      still attached to ``x``'s graph, so that a step whose batch has one image goes on);
    - duplicates (two identical images, a collapsed batch): ``d_i`` is clamped to at least
      ``eps``, so each term is at most ``-log(eps)`` (18.4 for 1e-8), and a clamped term's
      gradient is zero instead of the ``1 / d`` that grows without bound as two vectors meet;
    - bf16 or fp16 autocast: it runs in fp32 with autocast off, so a small ``eps`` does not
      round to 0, and distances are differences of the vectors, not ``2 - 2 cos``, which loses
      every digit of a small distance to cancellation.

    The nearest neighbour is chosen by the largest dot product (the same as the smallest
    distance on the sphere) without a gradient, as in the official code; the gradient flows
    through the distance to it. Under DDP the neighbours are searched among this rank's rows
    only, as the official code does: no rows are gathered, so the loss depends on the batch per
    rank, and each rank's term is averaged with the others' by DDP's gradient mean. DINOv2 calls
    it on each global crop's class tokens separately and sums the two.
    """
    if x.dim() != 2:
        raise ValueError(f"koleo_loss takes vectors (n, d); got a tensor of shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"koleo_loss needs eps > 0 to bound log(distance); got eps={eps}")
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=1, eps=eps)
        n = z.shape[0]
        if n < 2:
            return z.sum() * 0.0
        with torch.no_grad():
            dots = z @ z.t()
            dots.fill_diagonal_(-float("inf"))
            nearest = dots.argmax(dim=1)
        squared = (z - z[nearest]).square().sum(dim=1)
        # log(max(d, eps)) as half the log of the squared distance: no sqrt to differentiate at 0
        return -0.5 * squared.clamp_min(eps * eps).log().mean()


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Soft assignments ``(B, K)`` of a batch to ``K`` prototypes from ``scores`` ``(B, K)``
    that use every prototype equally often over the batch; each row sums to 1. In fp32.

    The Sinkhorn-Knopp solution of an entropy-regularised transport problem (SwAV, Caron et al.
    2020, arXiv:2006.09882, eq. 3-5; DINOv2's teacher centring, Oquab et al. 2023, Section 4)::

        Q = exp(scores / temperature)^T   (K x B), scaled to total 1, then `iterations` times:
            rows (prototypes) scaled to sum to 1/K, then columns (samples) to sum to 1/B
        returned: Q^T * B, so that each sample's assignment sums to 1

    ``temperature`` is SwAV's ``epsilon`` (0.05) or DINOv2's ``teacher_temp`` (0.04-0.07); the
    columns are normalised last, so each row of the result sums to 1 up to rounding, while each
    column (prototype) only approaches ``B / K`` as the iterations go on. ``B`` is the global
    batch: under DDP every rank passes its own rows and the sums over samples run over every
    rank (``all_reduce_sum``), as in both official implementations; each rank gets the
    assignments of its own rows. No gradient flows.

    The exponent is taken as it is, as both official codes do: ``scores / temperature`` must
    stay below about 88, where fp32's ``exp`` overflows. Both methods score unit vectors
    against unit vectors (SwAV's normalised prototypes, DINOv2's weight-normalised last layer on
    a normalised bottleneck), so ``|scores| <= 1`` and the exponent stays within 25.
    """
    if scores.dim() != 2:
        raise ValueError(
            f"sinkhorn_knopp takes scores (B, K); got a tensor of shape {tuple(scores.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"sinkhorn_knopp needs temperature > 0; got {temperature}")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs at least 1 iteration; got iterations={iterations}")
    q = torch.exp(scores.float() / temperature).t()  # K x B
    k, batch = q.shape[0], q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    return (q * batch).t()
