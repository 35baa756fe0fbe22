"""Distillation: a small student learns the features of a large frozen teacher.

The teacher is a pre-trained backbone (``distill.teacher``: a published model such as
``timm:vit_small_patch14_dinov2.lvd142m``, an sslplug run folder or export, or a weights file);
the student is the run's backbone, of any kind, with a head to the teacher's width. Both see the
same augmented views, the teacher each view resized to its own side (Beyer et al. 2022,
"Knowledge distillation: A good teacher is patient and consistent", arXiv:2106.05237: the
teacher and the student must see the same crop). The teacher runs in eval mode, without
gradient, in bf16 where the device computes in it (``sslplug.FrozenTeacher``).

Two losses, as lightly-train's distillation methods use them (docs.lightly.ai, "Distillation"):

- ``mse``: the squared distance between the L2-normalised student head output ``s`` and teacher
  features ``t`` of the same view, ``|s - t|^2 = 2 - 2 cos(s, t)``, averaged over views and
  images (feature regression, lightly-train's ``distillationv2``);
- ``queue``: ``t`` and ``s`` are each scored against a queue of the teacher's features of
  earlier batches, a pseudo-classifier with a class per queued image; the student's softmax over
  the queue learns the teacher's, by cross-entropy, at one temperature (lightly-train's
  ``distillationv1``; SEED, Fang et al. 2021, arXiv:2101.04731, distils a similarity
  distribution over a queue the same way);
- ``both``: their sum.

Usage::

    sslplug run --plugin distill --set distill.teacher=timm:vit_small_patch14_dinov2.lvd142m
    sslplug run --plugin distill --set distill.teacher=runs/teacher --set model.backbone=small
"""

from __future__ import annotations

import weakref
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, TargetUpdate, Views

DEFAULT_TEACHER = "timm:vit_small_patch14_dinov2.lvd142m"


@attrs.define
class DistillSettings:
    """The teacher, the head, the loss, and the student's views.

    ``teacher``: what ``sslplug.pretrained_backbone`` takes (``timm:NAME`` or a torchvision
    backbone with published weights, a run folder or ``last.pt``, an export, a weights file
    whose architecture ``teacher_backbone`` names, or ``random:BACKBONE``, a teacher that knows
    nothing: the baseline). ``teacher_image_size``: the side the teacher sees (0: the side of
    the run or export it comes from, 224 for published weights, the run's own for a random
    teacher). ``head_hidden_dim``: the
    student's head, Linear-BN-ReLU-Linear with this hidden width (0: one linear layer).
    ``views``: augmented views of each image, SimCLR's recipe (Chen et al. 2020) with
    ``crop_scale`` and ``color_strength``; the teacher sees the same views.
    """

    teacher: str = DEFAULT_TEACHER
    teacher_backbone: str = ""
    teacher_image_size: int = attrs.field(default=0, validator=sslplug.non_negative)
    loss: Literal["mse", "queue", "both"] = "mse"
    queue_size: int = attrs.field(default=4096, validator=sslplug.positive)
    temperature: float = attrs.field(default=0.07, validator=sslplug.positive)
    head_hidden_dim: int = attrs.field(default=1024, validator=sslplug.non_negative)
    views: int = attrs.field(default=2, validator=sslplug.positive)
    crop_scale: tuple[float, float] = attrs.field(default=(0.2, 1.0), validator=sslplug.scale_range)
    color_strength: float = attrs.field(default=0.5, validator=sslplug.non_negative)


# the teacher an encoder was built for, handed to the target network built after it
_TEACHERS: weakref.WeakKeyDictionary[nn.Module, sslplug.PretrainedBackbone] = (
    weakref.WeakKeyDictionary()
)


def build_teacher(settings: DistillSettings, run: RunContext) -> sslplug.PretrainedBackbone:
    """The teacher ``settings`` name, for the views of ``run`` (a random teacher at their side)."""
    size = settings.teacher_image_size
    if not size and settings.teacher.startswith("random:"):
        size = run.image_size
    return sslplug.pretrained_backbone(settings.teacher, size, settings.teacher_backbone)


class DistillEncoder(sslplug.ProjectorEncoder):
    """The student: the run's backbone and a head to the teacher's width."""

    def __init__(self, backbone: nn.Module, feature_dim: int, width: int, hidden: int) -> None:
        head: nn.Module = (
            MLP(feature_dim, [hidden], width) if hidden else nn.Linear(feature_dim, width)
        )
        super().__init__(backbone, feature_dim, head, width)


class DistillLoss(sslplug.Loss):
    """``mse``, ``queue`` or ``both`` (see the module's docstring) over every view.

    The queue holds L2-normalised teacher features of earlier batches, oldest replaced first;
    it starts as random unit vectors and is filled after ``queue_size`` images. It is a buffer,
    so every checkpoint holds it. On many ranks every rank's features are enqueued, in rank
    order, so the queue is the same everywhere.
    """

    requires = frozenset({"projection", "teacher_features"})
    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, kind: str, width: int, queue_size: int, temperature: float) -> None:
        super().__init__()
        self.kind = kind
        self.temperature = temperature
        size = queue_size if kind != "mse" else 1
        self.register_buffer("queue", F.normalize(torch.randn(size, width), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assert target is not None  # required capability: teacher_features
        count = min(len(outputs.projections), len(target.features))
        with torch.autocast(target.features[0].device.type, enabled=False):
            s = torch.cat([F.normalize(p.float(), dim=-1) for p in outputs.projections[:count]])
            t = torch.cat([F.normalize(f.float(), dim=-1) for f in target.features[:count]])
            if s.shape[-1] != t.shape[-1]:
                raise sslplug.ComponentMismatchError(
                    f"the encoder's projections are {s.shape[-1]}-d and the teacher's features "
                    f"{t.shape[-1]}-d; distillation needs a head to the teacher's width "
                    f"(--encoder distill)"
                )
            cosine = (s * t).sum(-1)
            loss = torch.zeros((), device=s.device)
            if self.kind in ("mse", "both"):
                loss = loss + (2.0 - 2.0 * cosine).mean()
            if self.kind in ("queue", "both"):
                loss = loss + self._queue_loss(s, t)
        return sslplug.LossResult(loss, {"cosine": cosine.mean().detach()})

    def _queue_loss(self, s: Tensor, t: Tensor) -> Tensor:
        queue = self.queue.clone()
        teacher = F.softmax(t @ queue.T / self.temperature, dim=-1)
        student = F.log_softmax(s @ queue.T / self.temperature, dim=-1)
        self._enqueue(t.detach())
        return -(teacher * student).sum(-1).mean()

    @torch.no_grad()
    def _enqueue(self, features: Tensor) -> None:
        new = sslplug.gather(features.contiguous())
        size = self.queue.shape[0]
        new = new[-size:]
        rows = (self.queue_ptr + torch.arange(new.shape[0], device=new.device)) % size
        self.queue.index_copy_(0, rows, new.to(self.queue.dtype))
        self.queue_ptr.add_(new.shape[0]).remainder_(size)


@sslplug.hookimpl
def sslplug_settings() -> type:
    return DistillSettings


@sslplug.hookimpl
def sslplug_augmentation(settings: DistillSettings, run: RunContext) -> sslplug.Augmentations:
    return sslplug.simclr_recipe(
        run.image_size,
        views=settings.views,
        crop_scale=settings.crop_scale,
        color_strength=settings.color_strength,
    )


@sslplug.hookimpl
def sslplug_encoder(
    settings: DistillSettings, run: RunContext, backbone: nn.Module, feature_dim: int
) -> Encoder:
    teacher = build_teacher(settings, run)
    encoder = DistillEncoder(backbone, feature_dim, teacher.feature_dim, settings.head_hidden_dim)
    _TEACHERS[encoder] = teacher
    return encoder


@sslplug.hookimpl
def sslplug_target_update(
    settings: DistillSettings, run: RunContext, encoder: Encoder
) -> TargetUpdate:
    teacher = _TEACHERS.pop(encoder, None) or build_teacher(settings, run)
    return sslplug.FrozenTeacher(teacher, name=f"the teacher {settings.teacher!r}")


@sslplug.hookimpl
def sslplug_loss(settings: DistillSettings, encoder: Encoder) -> nn.Module:
    width = sslplug.projection_dim_for(encoder, "distill")
    return DistillLoss(settings.loss, width, settings.queue_size, settings.temperature)
