"""Collectives with gradients, for losses that need the whole batch when it is split over ranks.

Under DistributedDataParallel each rank holds ``B`` of the ``W * B`` images of a step, and DDP
averages the parameter gradients over the ranks. A loss whose terms couple samples (SimCLR's
negatives, Barlow Twins' batch statistics and cross-correlation) must therefore see the other
ranks' embeddings, and the gradient that reaches a rank's embeddings must be the sum of what
every rank's loss sends them. Then ``mean over ranks of d(loss_r)/d(theta)`` equals the
gradient of the one-process loss on the whole batch. lightly shipped both halves wrong once
(its issues #1528 and #1977: a gather without gradient, and a reduction whose gradient was not
summed); ``tests/test_distributed.py`` checks ours against one process with the whole batch.

Without an initialised process group (one process), every function here is the identity, so
losses call them unconditionally. ``start`` joins the group that ``torchrun`` describes in the
environment; the engine uses the rest to keep ranks in step (a stop request, a non-finite loss)
and to let rank 0 alone write.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

__all__ = [
    "all_reduce_sum",
    "any_rank",
    "gather",
    "gather_objects",
    "is_distributed",
    "is_main",
    "mean_over_ranks",
    "rank",
    "start",
    "stop",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` whose backward sums the gradient over ranks and keeps this rank's slice.

    Written with ``all_reduce`` rather than taken from ``torch.distributed.nn``, whose backward
    needs reduce-scatter or all-to-all, which not every backend (gloo on the CPU) provides.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along the first dimension, in rank order, with the
    gradient flowing back to the rank that contributed each slice. Every rank must pass a
    tensor of the same shape."""
    if not is_distributed():
        return tensor
    return _GatherWithGradient.apply(tensor)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks; its gradient is summed over ranks too."""
    if not is_distributed():
        return tensor
    return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM)


def start(device_name: str) -> torch.device | None:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment) and return this rank's device: ``cuda:LOCAL_RANK`` with the NCCL backend when
    CUDA is there and not refused, else the CPU with gloo. ``None`` when not distributed."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available() and device_name != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0, which alone writes logs, checkpoints and summaries; True in one process."""
    return rank() == 0


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(value: float) -> float:
    """The mean of a number over ranks (every rank gets the same answer)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item() / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
