"""KoLeo and Sinkhorn-Knopp (``sslplug/spreading.py``) against loop implementations of their
formulas, and KoLeo's promise never to return NaN or inf: batches of 0, 1 and 2, duplicates,
zero rows, bf16 autocast, and the gradients of each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sslplug

# reference formulas ---------------------------------------------------------------------------


def reference_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-1/n sum_i log(max(d_i, eps))`` with ``d_i = min over j != i of |x_i - x_j|`` on the
    L2-normalised rows, one row at a time in float64; differentiable."""
    z = x.double() / x.double().norm(dim=1, keepdim=True)
    n = z.shape[0]
    terms = []
    for i in range(n):
        nearest = min(
            ((z[i] - z[j]).norm() for j in range(n) if j != i), key=lambda d: float(d.detach())
        )
        terms.append(torch.log(torch.clamp(nearest, min=eps)))
    return -torch.stack(terms).mean()


def reference_sinkhorn(scores: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """The alternate normalisations written out element by element in float64: ``Q[k][b] =
    exp(scores[b][k] / temperature)`` scaled to total 1, then each row (prototype) scaled to sum
    to 1/K and each column (sample) to 1/B, ``iterations`` times; returned as ``B x K`` times B."""
    b, k = scores.shape
    q = [[math.exp(float(scores[j, i]) / temperature) for j in range(b)] for i in range(k)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for i in range(k):
            row_sum = sum(q[i])
            q[i] = [v / row_sum / k for v in q[i]]
        for j in range(b):
            column_sum = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] = q[i][j] / column_sum / b
    return torch.tensor(q, dtype=torch.float64).t() * b


def _random(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _loss_and_grad(x: torch.Tensor, **kwargs: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = sslplug.koleo_loss(x, **kwargs)
    loss.backward()
    assert x.grad is not None
    return loss.detach(), x.grad


# KoLeo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(2, 4), (3, 8), (17, 8), (64, 32)])
def test_koleo_matches_the_loop_formula(n, d):
    x = _random(n, d, seed=n)
    loss, grad = _loss_and_grad(x)
    x64 = x.double().requires_grad_(True)
    reference = reference_koleo(x64)
    reference.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-3, atol=1e-6)


def test_koleo_is_lower_for_a_spread_batch():
    """Minimising it spreads: the corners of a simplex score lower than a tight cluster."""
    spread = torch.eye(4)
    tight = torch.ones(4, 4) + 0.01 * _random(4, 4)
    assert sslplug.koleo_loss(spread) < sslplug.koleo_loss(tight)


@pytest.mark.parametrize("n", [0, 1])
def test_koleo_without_a_neighbour_is_zero_with_a_zero_gradient(n):
    loss, grad = _loss_and_grad(_random(n))
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros(n, 8))


def test_koleo_of_two_vectors_is_minus_the_log_of_their_distance():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    loss, grad = _loss_and_grad(x)
    torch.testing.assert_close(loss, torch.tensor(-math.log(math.sqrt(2.0))))
    assert torch.isfinite(grad).all()


def test_koleo_of_duplicates_is_bounded_by_minus_log_eps():
    """A batch of one image repeated: every distance is 0, clamped to eps."""
    x = _random(1).repeat(6, 1)
    for eps in (1e-8, 1e-4):
        loss, grad = _loss_and_grad(x, eps=eps)
        torch.testing.assert_close(loss, torch.tensor(-math.log(eps)), rtol=1e-5, atol=0)
        assert torch.equal(grad, torch.zeros_like(x))


def test_koleo_with_two_identical_rows_stays_finite_and_matches_the_loop():
    x = _random(10)
    x[7] = x[2]
    loss, grad = _loss_and_grad(x)
    assert math.isfinite(loss.item())
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0  # the other rows still push apart
    torch.testing.assert_close(loss.double(), reference_koleo(x).detach(), rtol=1e-5, atol=1e-6)


def test_koleo_with_zero_rows_stays_finite():
    x = _random(5)
    x[1] = 0.0
    x[3] = 0.0
    loss, grad = _loss_and_grad(x)
    assert math.isfinite(loss.item())
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_koleo_runs_in_fp32_under_bf16_autocast(dtype):
    x = _random(16)
    x[5] = x[9]  # a duplicate: its 1e-8 floor would be lost to cancellation in bf16
    x = x.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sslplug.koleo_loss(x)
    loss.backward()
    assert loss.dtype == torch.float32
    assert math.isfinite(loss.item())
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, sslplug.koleo_loss(x.detach().float()))


@pytest.mark.parametrize(
    ("x", "eps", "message"),
    [
        (torch.zeros(8), 1e-8, "shape \\(8,\\)"),
        (torch.zeros(2, 3, 4), 1e-8, "shape \\(2, 3, 4\\)"),
        (torch.zeros(3, 4), 0.0, "eps=0.0"),
    ],
)
def test_koleo_refuses_bad_arguments(x, eps, message):
    with pytest.raises(ValueError, match=message):
        sslplug.koleo_loss(x, eps=eps)


# Sinkhorn-Knopp -------------------------------------------------------------------------------


def _scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    """Cosine scores of ``b`` embeddings against ``k`` prototypes, as SwAV and DINOv2 make."""
    g = torch.Generator().manual_seed(seed)
    z, c = torch.randn(b, 16, generator=g), torch.randn(k, 16, generator=g)
    return F.normalize(z, dim=1) @ F.normalize(c, dim=1).t()


@pytest.mark.parametrize(
    ("b", "k", "temperature", "iterations"),
    [
        (12, 5, 0.05, 3),  # SwAV's epsilon
        (7, 9, 0.04, 1),  # DINOv2's first teacher temperature, more prototypes than samples
        (20, 4, 0.07, 10),
    ],
)
def test_sinkhorn_knopp_matches_the_loop_formula(b, k, temperature, iterations):
    scores = _scores(b, k, seed=b)
    codes = sslplug.sinkhorn_knopp(scores, temperature, iterations)
    assert codes.shape == (b, k)
    assert codes.dtype == torch.float32
    expected = reference_sinkhorn(scores, temperature, iterations)
    torch.testing.assert_close(codes.double(), expected, rtol=1e-4, atol=1e-9)


def test_sinkhorn_knopp_rows_sum_to_one_and_columns_approach_b_over_k():
    """Each sample's assignment (a row) sums to 1, as both methods read it, whatever the
    iterations; the prototypes' totals (columns) only tend to B / K as the iterations go on."""
    b, k = 64, 10
    off = []
    for iterations in (1, 3, 50):
        codes = sslplug.sinkhorn_knopp(_scores(b, k), 0.05, iterations)
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(b), rtol=1e-5, atol=0)
        off.append((codes.sum(dim=0) * k / b - 1).abs().max().item())
    assert off == sorted(off, reverse=True), off
    assert off[-1] < 1e-4, off


def test_sinkhorn_knopp_is_fp32_without_a_gradient_under_bf16_autocast():
    scores = _scores(32, 8).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sslplug.sinkhorn_knopp(scores, 0.05)
        from_bf16 = sslplug.sinkhorn_knopp(scores.detach().bfloat16(), 0.05)
    assert codes.dtype == from_bf16.dtype == torch.float32
    assert not codes.requires_grad
    assert torch.equal(codes, sslplug.sinkhorn_knopp(scores.detach(), 0.05))
    torch.testing.assert_close(from_bf16, codes, rtol=0.1, atol=1e-3)


@pytest.mark.parametrize(
    ("scores", "temperature", "iterations", "message"),
    [
        (torch.zeros(8), 0.05, 3, "shape \\(8,\\)"),
        (torch.zeros(4, 3), 0.0, 3, "temperature > 0; got 0.0"),
        (torch.zeros(4, 3), 0.05, 0, "iterations=0"),
    ],
)
def test_sinkhorn_knopp_refuses_bad_arguments(scores, temperature, iterations, message):
    with pytest.raises(ValueError, match=message):
        sslplug.sinkhorn_knopp(scores, temperature, iterations)
