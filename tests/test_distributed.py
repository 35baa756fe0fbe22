"""Losses split over two ranks (gloo, CPU) against one process with the whole batch.

Each rank holds half the embeddings. After backward, the gradient on a rank's embeddings,
divided by the world size as DDP's averaging does, must equal the one-process gradient on the
same rows, and the losses must agree (SimCLR and BYOL: the mean over ranks; Barlow Twins: every
rank computes the whole batch's loss).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sslplug_methods import barlow_twins, byol, simclr

import sslplug

WORLD = 2
ROWS, DIM = 8, 16  # per rank


def _loss(name: str, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    if name == "simclr":
        return simclr.nt_xent(z1, z2, temperature=0.5)
    if name == "barlow_twins":
        c = barlow_twins.cross_correlation(z1, z2)
        diagonal = torch.diagonal(c)
        return (1 - diagonal).pow(2).sum() + 5e-3 * (c.pow(2).sum() - diagonal.pow(2).sum())
    return byol.regression_loss(z1, z2)


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(WORLD * ROWS, DIM, generator=generator),
        torch.randn(WORLD * ROWS, DIM, generator=generator),
    )


def _worker(rank: int, name: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        assert sslplug.world_size() == WORLD and sslplug.rank() == rank
        z1, z2 = (
            z[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_() for z in _embeddings()
        )
        loss = _loss(name, z1, z2)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo ranks in spawned processes
@pytest.mark.parametrize("name", ["simclr", "barlow_twins", "byol"])
def test_two_ranks_match_one_process_with_the_whole_batch(name, tmp_path: Path):
    z1, z2 = (z.clone().requires_grad_() for z in _embeddings())
    loss = _loss(name, z1, z2)
    loss.backward()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(name, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    losses = torch.stack([r["loss"] for r in ranks])
    if name == "barlow_twins":
        torch.testing.assert_close(losses, loss.detach().expand(WORLD), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(losses.mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    for r, result in enumerate(ranks):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        torch.testing.assert_close(result["g1"] / WORLD, z1.grad[rows], rtol=1e-4, atol=1e-6)
        if name == "byol":  # the target side is detached: no gradient, on one rank or two
            assert result["g2"] is None and z2.grad is None
        else:
            torch.testing.assert_close(result["g2"] / WORLD, z2.grad[rows], rtol=1e-4, atol=1e-6)


def test_one_process_collectives_are_the_identity():
    x = torch.randn(3, 4)
    assert sslplug.gather(x) is x and sslplug.all_reduce_sum(x) is x
    assert sslplug.world_size() == 1 and sslplug.rank() == 0
