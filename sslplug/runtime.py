"""Where and how a run computes: the device, random-number state, mixed precision, compilation,
and the placement of components on the device (and over ranks). Shared by training, the
benchmark and the evaluation commands, so each of these is written once."""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import torch
from torch import nn

from sslplug.errors import ConfigError, SslplugError

if TYPE_CHECKING:
    from sslplug.plugins import Components

__all__ = [
    "CompileError",
    "Precision",
    "autocast_context",
    "compile_components",
    "compile_failures",
    "cpu_has_native_bf16",
    "place",
    "resolve_device",
    "resolve_precision",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "wrap_for_ddp",
]

# /proc/cpuinfo flags of x86 CPUs that compute in bf16 natively: Intel AMX (Sapphire Rapids
# and later) and AVX512-BF16 (Cooper Lake, Sapphire Rapids, AMD Zen 4 and later)
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


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


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first processor in ``path`` (empty where there is no such
    file, as on macOS and Windows)."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX or AVX512-BF16), where bf16 autocast
    is faster than fp32 rather than emulated and slower.

    torch's own checks (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``,
    which also ask whether the operating system enabled AMX) are preferred; a torch without
    them falls back on the flags of ``/proc/cpuinfo``. Other CPUs (ARM included) answer no.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512_bf16 is not None:
        return bool(amx() or avx512_bf16())
    return bool(_cpuinfo_flags() & NATIVE_BF16_FLAGS)


@attrs.frozen
class Precision:
    """The precision a run computes in (``bf16`` autocast or plain ``fp32``) and why."""

    name: Literal["bf16", "fp32"]
    reason: str

    def __str__(self) -> str:
        return f"precision {self.name}: {self.reason}"


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """What ``train.precision`` means on ``device``.

    ``bf16`` and ``fp32`` are taken as they are. ``auto`` is bf16 on CUDA and on a CPU that
    computes in bf16 natively (``cpu_has_native_bf16``), and fp32 on other CPUs, where bf16
    is emulated and slower than fp32.
    """
    if setting == "bf16":
        return Precision("bf16", "train.precision=bf16")
    if setting == "fp32":
        return Precision("fp32", "train.precision=fp32")
    if setting != "auto":
        raise ConfigError(
            f"train.precision {setting!r} is not a precision; valid: auto, bf16, fp32"
        )
    if device.type == "cuda":
        return Precision("bf16", "train.precision=auto on CUDA")
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision(
            "bf16", "train.precision=auto on a CPU with native bf16 (AMX or AVX512-BF16)"
        )
    if device.type == "cpu":
        return Precision(
            "fp32", "train.precision=auto on a CPU without native bf16 (AMX or AVX512-BF16)"
        )
    return Precision("fp32", f"train.precision=auto on {device.type}")


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``resolve_precision`` says bf16; otherwise nothing."""
    if resolve_precision(precision, device).name == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CompileError(SslplugError):
    """``torch.compile`` could not compile a component for this device."""


def compile_components(components: Components) -> None:
    """Compile, in place, the forward of the encoder and of the target update: the components
    that run the networks.

    ``Module.compile`` wraps the call and leaves the module as it was, so state-dict keys (and
    checkpoints) are the same as without compilation, and a run may be resumed either way.
    Nothing compiles until the first step, which then takes longer (25 to 50 s for BYOL with
    the small backbone on two CPU cores; inductor caches the result on disk for later runs).
    The view generator is not compiled: its random choices per image read tensors back to the
    host, which breaks the graph at every draw and recompiles until torch gives up.
    """
    for module in (components.encoder, components.target_update):
        if module is not None:
            module.compile()


@contextlib.contextmanager
def compile_failures(device: torch.device | str, compiled: bool = True) -> Iterator[None]:
    """Turn a failure of ``torch.compile`` (which compiles on the first calls of the forward
    and of the backward) into an error that says so and how to train without it; when
    ``compiled`` is false (``train.compile`` is off), such a failure is a plugin's own and
    passes as it is."""
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as exc:
        if not compiled:
            raise
        cause: BaseException = exc
        while getattr(cause, "inner_exception", None) is not None:  # the backend's own error
            cause = cause.inner_exception  # type: ignore[attr-defined]
        lines = [line for line in str(cause).splitlines() if line.strip()]
        raise CompileError(
            f"torch.compile failed to compile the model for device {str(device)!r} "
            f"(train.compile=true): {type(cause).__name__}: {lines[0] if lines else ''}. "
            f"Train without compiling: --set train.compile=false (`sslplug bench`: leave out "
            f"--compile)"
        ) from exc


# mallopt's parameters (glibc's malloc.h) and the size under which freed blocks stay
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _KEPT_BLOCKS = -1, -3, 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process keep the blocks it frees, up to 1 GiB each, for its next allocations.

    glibc hands every block over 32 MiB (a batch's activations: 512 views of 16x32x32 floats
    are 32 MiB) straight back to the system when freed, so each step maps it again and the
    kernel zeroes it again: on two CPU cores about a seventh of the default run went there.
    Raising the thresholds of ``mallopt`` (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``) keeps
    those blocks in the process; its memory stays at its peak instead of dropping between
    steps. Whether it took: ``False`` where the C library is not glibc (macOS, Windows, musl).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    kept = mallopt(_M_MMAP_THRESHOLD, _KEPT_BLOCKS) and mallopt(_M_TRIM_THRESHOLD, _KEPT_BLOCKS)
    return bool(kept)


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
