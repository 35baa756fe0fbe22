"""A frozen teacher: a target network with weights of its own that training never changes.

``FrozenTeacher`` is the target component of distillation (the ``distill`` plugin) and of any
plugin that learns from a pre-trained model: it holds a backbone with weights
(``sslplug.pretrained_backbone``), runs it without gradient and in eval mode on every view,
resized to the side the teacher was trained on, in bf16 where the device computes in it (CUDA,
or a CPU with AMX or AVX512-BF16), and gives its features as the target's ``features``, one
tensor per view, in fp32. Its ``step`` changes nothing.

Its weights are not part of a checkpoint: a run rebuilds its teacher from the settings that
name it, as it rebuilds its backbone. The checkpoint keeps a fingerprint of the teacher's
weights instead, and resuming with a teacher whose weights differ is an error, so that a run
never continues silently from another teacher than the one it started with.

``EMATeacher`` is the other kind: a momentum copy of the whole encoder (DINO's, iBOT's and
DINOv2's teacher) that returns what the encoder returns, tokens included.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslplug.components import Encoder, Outputs, TargetUpdate, Views
from sslplug.errors import CheckpointError
from sslplug.nn import ema_update, scheduled_momentum
from sslplug.runtime import resolve_precision
from sslplug.weights import PretrainedBackbone

__all__ = ["EMATeacher", "FrozenTeacher", "fingerprint"]

_PREFIX = "teacher."


def fingerprint(module: nn.Module) -> Tensor:
    """A summary of ``module``'s weights that changes when any of them does: the sum over its
    tensors of their values weighted by their position, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for index, tensor in enumerate(module.state_dict().values()):
        if tensor.is_floating_point():
            values = tensor.detach().double().flatten().cpu()
            weights = torch.linspace(1.0, 2.0, values.numel(), dtype=torch.float64)
            total += (index + 1) * (values * weights).sum()
    return total


class FrozenTeacher(TargetUpdate):
    """A pre-trained backbone whose features of each view are the target.

    Attributes:
        teacher: the backbone (eval mode, no gradient); not in ``state_dict``.
        width: the width of its features.
        image_size: the side views are resized to before it sees them.
        source: what named it (for messages and the run's record).
    """

    provides = frozenset({"teacher_features"})
    teacher_fingerprint: Tensor

    def __init__(self, teacher: PretrainedBackbone, name: str = "the teacher") -> None:
        super().__init__()
        self.teacher = teacher.module.eval().requires_grad_(False)
        self.width = teacher.feature_dim
        self.image_size = teacher.image_size
        self.source = teacher.source
        self.name = name
        self.register_buffer("teacher_fingerprint", fingerprint(self.teacher))
        self.register_state_dict_post_hook(_without_teacher)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """The target follows the run's mode; the teacher stays in eval mode (its batch-norm
        statistics and dropout are those it was trained with)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _resized(self, images: Tensor) -> Tensor:
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        size = (self.image_size, self.image_size)
        return F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)

    def forward(self, views: Views) -> Outputs:
        device = views.images[0].device
        bf16 = resolve_precision("auto", device).name == "bf16"
        features = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for images in views.images:
                features.append(self.teacher(self._resized(images)).float())
        return Outputs(features=tuple(features))

    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load the target's state, after checking that the teacher is the run's own."""
        saved = state_dict.get("teacher_fingerprint")
        if saved is not None and not torch.allclose(
            saved.double().cpu(), self.teacher_fingerprint.double().cpu(), rtol=1e-9, atol=0.0
        ):
            raise CheckpointError(
                f"{self.name} ({self.source}) is not the one this run was trained with: its "
                f"weights differ (fingerprint {float(self.teacher_fingerprint):.6g}, saved "
                f"{float(saved):.6g}); resume with the teacher the run started from"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _without_teacher(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + _PREFIX)]:
        del state[key]


def _teacher_not_missing(module: nn.Module, incompatible: Any) -> None:
    missing = [k for k in incompatible.missing_keys if k.startswith(_PREFIX) or f".{_PREFIX}" in k]
    for key in missing:
        incompatible.missing_keys.remove(key)


class EMATeacher(TargetUpdate):
    """A momentum copy of the whole encoder, for any encoder: ``forward(views)`` returns what
    the encoder's ``forward`` returns (projections, logits, tokens in ``extras``), without
    gradient; ``step`` moves every weight as ``theta <- m * theta + (1 - m) * theta_online``
    and copies the buffers, with ``m`` on BYOL's cosine from ``momentum_base`` to 1 (or
    constant with ``schedule="constant"``), logged under ``metric``.

    The copy stays in eval mode however the run sets modes (``train_mode=True`` to follow the
    run's): stochastic depth and dropout are off in the teacher, as DINO's, iBOT's and DINOv2's
    official teachers are built without them, and a batch norm in it normalises with the
    running statistics it copies from the online encoder. ``reads`` names the view groups it
    sees (``("global",)`` for DINO's teacher; ``None``: every view) and ``provides`` the
    capabilities its outputs carry. The copy is ``network``, in the checkpoint.
    """

    metric = "momentum"

    def __init__(
        self,
        encoder: Encoder,
        momentum_base: float,
        schedule: str = "cosine",
        reads: Iterable[str] | None = None,
        provides: Iterable[str] = (),
        train_mode: bool = False,
    ) -> None:
        super().__init__()
        scheduled_momentum(momentum_base, schedule, 0, 1)  # an unknown schedule is refused now
        if not 0.0 <= momentum_base <= 1.0:
            raise ValueError(f"momentum_base must be in [0, 1], got {momentum_base!r}")
        self.network = copy.deepcopy(encoder)
        self.network.requires_grad_(False)
        self.momentum_base = momentum_base
        self.schedule = schedule
        self.reads = None if reads is None else tuple(reads)
        self.provides = frozenset(provides)
        self.train_mode = train_mode
        self.train(self.training)

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.network.train(mode and self.train_mode)
        return self

    def momentum(self, step: int, total_steps: int) -> float:
        """``m`` after optimizer step ``step`` of ``total_steps``."""
        return scheduled_momentum(self.momentum_base, self.schedule, step, total_steps)

    def forward(self, views: Views) -> Any:
        return self.network(views)

    @torch.no_grad()
    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, Any] | None:
        momentum = self.momentum(step, total_steps)
        ema_update(self.network, encoder, momentum)
        return {self.metric: momentum}
