"""Where and how a run computes: the device, random-number state, mixed precision, and the
placement of components on the device (and over ranks). Shared by training, the benchmark and
the evaluation commands, so each of these is written once."""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sslplug.errors import ConfigError

if TYPE_CHECKING:
    from sslplug.plugins import Components

__all__ = [
    "autocast_context",
    "place",
    "resolve_device",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "wrap_for_ddp",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; anything else must be a valid torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is {name!r} but CUDA is not available here; use cpu or auto"
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random-number state of Python and torch (and CUDA), as checkpointable data."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` ``bf16``, or ``auto`` on CUDA; otherwise nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place(components: Components, device: torch.device, channels_last: bool) -> None:
    """Move every component to ``device``, with channels-last weights when asked."""
    for module in components.modules().values():
        if module is not None:
            module.to(device)
            if channels_last:
                # older torch stubs have no memory_format overload of Module.to
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]


def wrap_for_ddp(
    components: Components, device: torch.device, sync_batchnorm: bool
) -> dict[str, nn.Module]:
    """DistributedDataParallel wrappers of the encoder and, when it has trainable weights, the
    loss; batch norm synchronised over ranks when ``sync_batchnorm`` asks."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on "
                "the CPU); set it to false for CPU ranks"
            )
        components.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(components.encoder)
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped: dict[str, nn.Module] = {
        "encoder": DistributedDataParallel(components.encoder, device_ids=device_ids)
    }
    if any(p.requires_grad for p in components.loss.parameters()):
        wrapped["loss"] = DistributedDataParallel(components.loss, device_ids=device_ids)
    return wrapped
