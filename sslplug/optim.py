"""Optimizers and the learning-rate schedule.

SGD and AdamW come from torch. LARS (You et al. 2017), which BYOL, SimCLR and Barlow Twins use
at large batch sizes, is not in torch and is defined here: SGD with momentum whose step for each
weight matrix is scaled by ``eta * ||w|| / ||grad + wd * w||``. Biases and batch-norm parameters
get neither weight decay nor the trust ratio, as in those papers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from sslplug.config import OptimSettings

__all__ = ["LARS", "build_optimizer", "warmup_cosine"]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum.

    Parameter groups with ``lars_exclude=True`` (biases, norms) take plain SGD steps without
    weight decay.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _split_decay(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weights of linear and conv layers, and everything else (biases, norm parameters)."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def build_optimizer(settings: OptimSettings, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """The optimizer ``settings.name`` over the trainable parameters of ``modules``."""
    decay, no_decay = _split_decay(modules)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if settings.name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    if settings.name == "lars":
        groups[1]["lars_exclude"] = True
        return LARS(groups, lr=settings.lr, momentum=settings.momentum)
    return torch.optim.AdamW(groups, lr=settings.lr)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at each step: linear from 0 over ``warmup_steps``,
    then a cosine from 1 to 0 at ``total_steps`` (Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
