"""A device-placement check that runs on the CPU: which tensors would sit in host memory and
which on the accelerator if the same code ran on CUDA, and every operation that would mix them.

On CUDA, ``torch.arange(n)`` without ``device=`` makes a tensor in host memory; the first
operation that meets it with a tensor on the GPU raises ("Expected all tensors to be on the same
device"). On the CPU both are host tensors, so nothing fails and the bug waits for the first GPU
user. ``PlacementCheck`` is a ``TorchFunctionMode`` that follows every tensor as the code makes
it, with the run's device named ``cpu:0`` (``DEVICE``), which torch computes on like ``cpu``
but which the check can tell from it:

- a factory call (``arange``, ``zeros``, ``tensor``, ``randperm``, ...) with no tensor argument
  makes a **host** tensor, unless its ``device`` is ``cpu:0``, which makes a **device** tensor;
  ``device="cpu"`` makes a host tensor, as it would on a GPU machine;
- ``.to(cpu:0)`` makes a device tensor (a copy, as on CUDA; ``Module.to`` moves parameters and
  buffers so, and a plain tensor attribute a module forgot to register stays a host tensor);
  ``.cpu()`` and ``.to("cpu")`` make a host tensor;
- ``x.device`` answers ``cpu:0`` for a device tensor and ``cpu`` for a host one, so that
  ``torch.zeros(n, device=x.device)`` lands where ``x`` is;
- any other operation gives its outputs the place of its inputs: device if any input is;
- ``torch.from_numpy`` and ``torch.frombuffer`` make host tensors, and ``nn.Parameter(data)``
  takes the place of ``data`` (torch makes these without a torch function: they are wrapped
  while the check runs).

An operation whose inputs hold a device tensor and a host tensor of one or more dimensions is
recorded as a ``Misplacement``, with the line of the project's code that called it. Host 0-d
tensors (CUDA takes them as scalars), host indices into a device tensor (CUDA copies them over)
and copies (``copy_``, ``new_*``, ``*_as``) are allowed, as CUDA allows them.

What it cannot see: the branches taken only on CUDA (``device.type == "cuda"``: pinned memory,
nvJPEG decoding, the CUDA generator state), a CPU ``torch.Generator`` handed to a factory on the
device, and tensors made before the check began or by torch's C++ without a torch function
(they have no place and are not judged). ``benchmarks/gpu.sh`` runs those branches on a GPU;
docs/gpu.md lists them.

Why not the ``meta`` device: a training step reads values back (``.item()``, ``nonzero``,
boolean masks, the random choices of an augmentation), which meta tensors do not have.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import traceback
import unittest.mock
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["DEVICE", "Misplacement", "Place", "PlacementCheck"]

PROJECT = Path(__file__).resolve().parents[1]
# the device a run under the check computes on: the CPU, by a name the check tells from "cpu"
DEVICE = torch.device("cpu", 0)


class Place(enum.Enum):
    """Where a tensor would live on a machine with an accelerator."""

    HOST = "host"
    DEVICE = "device"


@attrs.frozen
class Misplacement:
    """One operation, at one line of the project's code, that mixed host and device tensors."""

    where: str  # path:line in function, of the innermost frame of the project's code
    operation: str
    device: tuple[tuple[int, ...], ...]  # the shapes of its device tensors
    host: tuple[tuple[int, ...], ...]  # the shapes of its host tensors

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.operation} mixes device tensors of shapes {list(self.device)} "
            f"with host tensors of shapes {list(self.host)}; on CUDA this raises. Make the host "
            f"tensors with device= (e.g. device=x.device) or move them with .to(device)"
        )


# operations that copy or read only the shape of their other tensors: no device is mixed
_COPIES = frozenset(
    {
        "copy_", "new_tensor", "new_empty", "new_zeros", "new_ones", "new_full",
        "expand_as", "view_as", "reshape_as", "set_",
        "_has_compatible_shallow_copy_type",  # Module.to asks before it swaps a weight's data
    }
)  # fmt: skip
_DATA_FACTORIES = frozenset({"tensor", "as_tensor", "asarray"})


def _name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in {"__get__", "__set__"}:  # a property of Tensor: name the property
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', name)}"
    return name


def _place_on(device: torch.device | str | int) -> Place:
    """Where a tensor made on ``device`` sits: ``cpu`` is the host; ``DEVICE`` (or CUDA) the
    device."""
    device = torch.device(device)
    return Place.HOST if device.type == "cpu" and device.index is None else Place.DEVICE


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _caller() -> str:
    """The innermost frame of the project's code (outside this module) on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(PROJECT) and path != Path(__file__) and ".venv" not in path.parts:
            return f"{path.relative_to(PROJECT)}:{frame.lineno} in {frame.name}"
    return "outside the project's code"


class PlacementCheck(TorchFunctionMode):
    """While active, give every tensor the code makes a ``Place`` and record in
    ``misplacements`` every operation that mixes the two (see the module's docstring). The
    code under the check computes on ``DEVICE``:

        with PlacementCheck() as check:
            train(config_with_train_device_cpu_0, registry)
        assert not check.misplacements, check.report()
    """

    def __init__(self) -> None:
        super().__init__()
        self._places: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._seen: dict[tuple[str, str], Misplacement] = {}
        self._patches = contextlib.ExitStack()

    @property
    def misplacements(self) -> list[Misplacement]:
        return list(self._seen.values())

    def report(self) -> str:
        return "\n".join(str(m) for m in self.misplacements)

    def place_of(self, tensor: torch.Tensor) -> Place | None:
        """The tensor's place, or ``None`` for one made before the check or around it."""
        return self._places.get(tensor)

    def mark(self, tensors: Iterable[torch.Tensor], place: Place | None) -> None:
        """Give ``tensors`` the place ``place`` (a data set in host memory, say)."""
        if place is not None:
            for tensor in tensors:
                self._places[tensor] = place

    def __enter__(self) -> PlacementCheck:
        for name in ("from_numpy", "frombuffer"):
            self._patches.enter_context(
                unittest.mock.patch.object(torch, name, self._made_on_host(getattr(torch, name)))
            )
        make = nn.Parameter.__dict__["__new__"].__func__

        def parameter(cls: type, data: torch.Tensor | None = None, requires_grad: bool = True):
            made = make(cls, data, requires_grad)
            self.mark([made], Place.HOST if data is None else self.place_of(data))
            return made

        self._patches.enter_context(
            unittest.mock.patch.object(nn.Parameter, "__new__", staticmethod(parameter))
        )
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._patches.close()

    def _made_on_host(self, factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(factory)
        def on_host(*args: Any, **kwargs: Any) -> torch.Tensor:
            made = factory(*args, **kwargs)
            self.mark([made], Place.HOST)
            return made

        return on_host

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        inputs = _tensors((args, kwargs))
        self._check(name, args, inputs)
        out = func(*args, **kwargs)
        if name == "Tensor.device" and self.place_of(args[0]) == Place.DEVICE:
            return DEVICE
        if name == "Tensor.data" and func.__name__ == "__set__":  # Module.to moves weights so
            self.mark([args[0]], self.place_of(args[1]))
            return out
        place = self._output_place(name, args, kwargs, inputs)
        if name in {"to", "cpu"} and out is args[0] and place != self.place_of(out):
            # x.cpu() of x on the CPU is x itself, where CUDA makes a copy: an alias takes
            # the host's place and x keeps its own
            out = out.view_as(out)
        self.mark(_tensors(out), place)
        return out

    def _output_place(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor]
    ) -> Place | None:
        if name == "to":
            if len(args) > 1 and isinstance(args[1], torch.Tensor):  # x.to(other)
                return self.place_of(args[1])
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            return self._joined(inputs[:1]) if device is None else _place_on(device)
        if name == "cpu":
            return Place.HOST
        if name == "cuda":
            return Place.DEVICE
        if name == "type_as":
            return self.place_of(args[1])
        if kwargs.get("device") is not None:
            return _place_on(kwargs["device"])
        if name in _COPIES or name in {"__getitem__", "__setitem__"}:
            return self.place_of(args[0])
        if name in _DATA_FACTORIES and args and not isinstance(args[0], torch.Tensor):
            return Place.HOST  # torch.tensor(data): host memory unless a device is named
        if not inputs:
            return Place.HOST
        return self._joined(inputs)

    def _joined(self, inputs: Iterable[torch.Tensor]) -> Place | None:
        places = {self.place_of(tensor) for tensor in inputs}
        if Place.DEVICE in places:
            return Place.DEVICE
        return Place.HOST if Place.HOST in places else None

    def _check(self, name: str, args: tuple[Any, ...], inputs: list[torch.Tensor]) -> None:
        if name in _COPIES or name in {"to", "cuda", "cpu", "type_as", "Tensor.data"}:
            return
        if name in {"__getitem__", "__setitem__"}:
            self._check_indexing(name, args)
            return
        self._check_mixed(name, inputs)

    def _check_indexing(self, name: str, args: tuple[Any, ...]) -> None:
        """CUDA indexes a device tensor with host indices (it copies them over), not a host
        tensor with device indices; an advanced assignment's values must sit with the
        tensor."""
        indexed, indices = args[0], _tensors(args[1])
        if self.place_of(indexed) == Place.HOST:
            self._check_mixed(name, [indexed, *indices])
        if name == "__setitem__" and indices and isinstance(args[2], torch.Tensor):
            self._check_mixed(name, [indexed, args[2]])

    def _check_mixed(self, name: str, inputs: list[torch.Tensor]) -> None:
        device = [t for t in inputs if self.place_of(t) == Place.DEVICE]
        host = [t for t in inputs if t.dim() > 0 and self.place_of(t) == Place.HOST]
        if not device or not host:
            return
        where = _caller()
        if (where, name) not in self._seen:
            self._seen[where, name] = Misplacement(
                where,
                name,
                tuple(tuple(t.shape) for t in device),
                tuple(tuple(t.shape) for t in host),
            )
