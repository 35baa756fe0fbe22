"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv:2104.14294).

A student network (backbone and DINO head) learns to give, for every crop of an image, the
distribution over ``K`` prototypes that a teacher network, an exponential moving average of the
student, gives for a *global* crop of the same image (Section 3.1, eq. 3 and Algorithm 1)::

    L = 1/|pairs| sum over i in global crops, j any crop, j != i of H(P_t(x_i), P_s(x_j))
    H(a, b) = -sum_k a_k log b_k
    P_s(x) = softmax(g_s(x) / tau_s)        P_t(x) = softmax((g_t(x) - c) / tau_t)

The teacher's output is centred and sharpened to avoid collapse (Section 3.1, "Avoiding
collapse"): the centre is an EMA of the teacher's mean output over the global batch,
``c <- m c + (1 - m) mean(g_t(x))`` (eq. 4), and ``tau_t`` is below ``tau_s``. Centring alone
would collapse to the uniform distribution, sharpening alone to one prototype. The student sees
every crop (multi-crop, Caron et al. 2020); the teacher only the two global ones.

The rest of the recipe (Section 4 and Appendix): ``tau_t`` rises linearly from 0.04 to 0.07
over the first epochs; the teacher's EMA rate follows a cosine from 0.996 to 1; the last layer of
the head is frozen during the first epoch; gradients are clipped to norm 3; the weight decay
follows a cosine from 0.04 to 0.4. Components here declare all of this to the core
(``OptimRules``, ``run.progress``) rather than training themselves.

The teacher keeps the centre and hands the loss its centred, sharpened distributions through
the capability ``dino_teacher_distribution``. After the two views of another augmentation
(``--augmentation simclr``: no groups, every view counts as global) it is DINO without
multi-crop, the setting of solo-learn's CIFAR configuration.

Usage::

    sslplug run --plugin dino --set dino.local_crops_number=8
    sslplug run --plugin simclr --augmentation dino     # SimCLR on DINO's multi-crop views
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import MLP, Encoder, Outputs, RunContext, TargetUpdate, Views

TEACHER_DISTRIBUTION = "dino_teacher_distribution"

# each of the three probabilities (first global crop, second global crop, local crops)
_probabilities = attrs.validators.deep_iterable(member_validator=sslplug.unit_interval)


@attrs.define
class DINOSettings:
    """DINO's recipe (Caron et al. 2021, Section 4, Appendix and the official ``main_dino.py``),
    scaled to 32 px images; the names are those of the official code.

    DINO publishes no CIFAR recipe. The crops follow the official code scaled to the image:
    global crops of the whole side with scale 0.4-1, local crops of 3/7 of the side (96 of
    224 px: 14 px at 32) with scale 0.05-0.4; blur with p 1.0/0.1/0.5 and solarisation with
    p 0/0.2/0 for the first global, second global and local crops; colour jitter and grayscale
    as BYOL's. The head has solo-learn's CIFAR widths (``scripts/pretrain/cifar/dino.yaml``:
    2048 hidden, 256 bottleneck, 4096 prototypes) narrowed for CPU runs, as noted below.

    Defaults that differ from the published values, to keep runs on two CPU cores practical:

    - ``hidden_dim`` 512 (2048), ``bottleneck_dim`` 128 (256), ``out_dim`` 1024 prototypes
      (65536 on ImageNet, 4096 in solo-learn's CIFAR configuration);
    - ``local_crops_number`` 6 (8 in the official code; the paper's best uses 10);
    - ``warmup_teacher_temp_epochs`` 5: the paper's 30 of 100 epochs scaled to the core's 15;
    - ``use_bn_in_head`` true (false in the official code, whose ``--use_bn_in_head`` option
      adds batch norm after each hidden layer of the head; solo-learn has the same option).
      On the default data the small convolutional backbone's pooled features (all after a
      ReLU) point nearly the same way for every image; without batch norm the head's outputs
      barely differ after centring, the teacher stays near uniform (entropy 6.88 of
      ``log 1024`` = 6.93, loss flat at 6.91) and kNN gains +12.8 points (seed 0); with it
      the teacher's entropy stays lower, more prototypes stay in use and kNN gains +16.7
      (``docs/methods/dino.md``).

    The teacher's EMA rate keeps the published 0.996 (solo-learn's CIFAR configuration uses
    0.9995 for 1000 epochs).

    ``freeze_last_layer`` and ``warmup_teacher_temp_epochs`` are in epochs. ``weight_decay``
    and ``weight_decay_end`` are the student's weight decay at the first and last step (AdamW,
    as the official code), whatever ``optim.weight_decay`` is (0 included; see
    ``DINOEncoder.optim_rules``).
    """

    out_dim: int = attrs.field(default=1024, validator=sslplug.positive)
    hidden_dim: int = attrs.field(default=512, validator=sslplug.positive)
    bottleneck_dim: int = attrs.field(default=128, validator=sslplug.positive)
    norm_last_layer: bool = True
    use_bn_in_head: bool = True
    local_crops_number: int = attrs.field(default=6, validator=sslplug.non_negative)
    local_crop_size: int = attrs.field(default=0, validator=sslplug.non_negative)
    global_crops_scale: tuple[float, float] = attrs.field(
        default=(0.4, 1.0), validator=sslplug.scale_range
    )
    local_crops_scale: tuple[float, float] = attrs.field(
        default=(0.05, 0.4), validator=sslplug.scale_range
    )
    blur_prob: tuple[float, float, float] = attrs.field(
        default=(1.0, 0.1, 0.5), validator=_probabilities
    )
    solarize_prob: tuple[float, float, float] = attrs.field(
        default=(0.0, 0.2, 0.0), validator=_probabilities
    )
    student_temp: float = attrs.field(default=0.1, validator=sslplug.positive)
    warmup_teacher_temp: float = attrs.field(default=0.04, validator=sslplug.positive)
    teacher_temp: float = attrs.field(default=0.07, validator=sslplug.positive)
    warmup_teacher_temp_epochs: float = attrs.field(default=5.0, validator=sslplug.non_negative)
    center_momentum: float = attrs.field(default=0.9, validator=sslplug.unit_interval)
    momentum_teacher: float = attrs.field(default=0.996, validator=sslplug.unit_interval)
    freeze_last_layer: float = attrs.field(default=1.0, validator=sslplug.non_negative)
    clip_grad: float = attrs.field(default=3.0, validator=sslplug.non_negative)
    weight_decay: float = attrs.field(default=0.04, validator=sslplug.positive)
    weight_decay_end: float = attrs.field(default=0.4, validator=sslplug.non_negative)


class DINOHead(nn.Module):
    """The projection head (Section 3.1 and Appendix): a 3-layer MLP with GELU onto a
    bottleneck (batch norm after each hidden layer with ``use_bn_in_head``, the official code's
    option), L2 normalisation, then a weight-normalised linear layer without bias onto
    ``out_dim`` prototypes (``settings.out_dim``, or ``out_dim`` when given: iBOT's patch head).
    Linear layers start from a truncated normal of std 0.02 with zero biases, as in the
    official code."""

    def __init__(self, in_dim: int, settings: DINOSettings, out_dim: int | None = None) -> None:
        super().__init__()
        hidden = settings.hidden_dim
        self.mlp = MLP(
            in_dim,
            [hidden, hidden],
            settings.bottleneck_dim,
            activation="gelu",
            batch_norm=settings.use_bn_in_head,
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.prototypes = MLP(
            settings.bottleneck_dim,
            [],
            settings.out_dim if out_dim is None else out_dim,
            weight_norm_last=True,
            norm_last_layer=settings.norm_last_layer,
        )

    @property
    def last_layer(self) -> nn.Linear:
        """The weight-normalised layer onto the prototypes, frozen during the first epoch."""
        return self.prototypes.last_layer

    def forward(self, features: Tensor) -> Tensor:
        return self.prototypes(F.normalize(self.mlp(features), dim=-1))


class DINOEncoder(sslplug.ProjectorEncoder):
    """The student: backbone and ``DINOHead``; the backbone runs once per crop size."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        settings: DINOSettings,
        optim_weight_decay: float = 0.0,
    ) -> None:
        head = DINOHead(feature_dim, settings)
        super().__init__(backbone, feature_dim, head, settings.out_dim)
        self.settings = settings
        self.optim_weight_decay = optim_weight_decay

    def optim_rules(self) -> sslplug.OptimRules:
        """The last layer frozen for ``freeze_last_layer`` epochs, clipping to ``clip_grad``, and
        the student's weight decay on a cosine from ``weight_decay`` to ``weight_decay_end``.

        The student's parameters form groups of weight decay ``weight_decay``, and the core's
        schedule ends each group at ``weight_decay_end / weight_decay`` times its own decay
        (``OptimRules.weight_decay_end_factor``), whatever ``optim.weight_decay`` is.
        (``optim_weight_decay``, which the absolute end of sslplug 0.2 needed, is unused.)
        """
        head = self.projector
        assert isinstance(head, DINOHead)
        return dino_optim_rules(self, [head], self.settings)


def dino_optim_rules(
    student: nn.Module, heads: list[DINOHead], settings: DINOSettings
) -> sslplug.OptimRules:
    """DINO's optimiser rules for ``student`` (iBOT and DINOv2 use them too): the last layer of
    each of ``heads`` frozen for ``freeze_last_layer`` epochs, gradients clipped to
    ``clip_grad``, and every parameter's weight decay on a cosine from ``weight_decay`` to
    ``weight_decay_end``, relative to the groups' own decay."""
    s = settings
    last = [p for head in heads for p in head.last_layer.parameters()]
    frozen = {id(p) for p in last}
    body = [p for p in student.parameters() if id(p) not in frozen]
    groups = (
        sslplug.ParamGroup(body, name="student", weight_decay=s.weight_decay),
        sslplug.ParamGroup(
            last,
            name="last_layer",
            weight_decay=s.weight_decay,
            frozen_epochs=s.freeze_last_layer,
        ),
    )
    return sslplug.OptimRules(
        groups=groups,
        clip_grad_norm=s.clip_grad,
        weight_decay_end_factor=s.weight_decay_end / s.weight_decay,
    )


def warmed_up(start: float, end: float, run: RunContext, epochs: float) -> float:
    """A value linear from ``start`` to ``end`` over the first ``epochs`` epochs of ``run``
    (``run.progress.epoch_float``), then ``end``: the teacher's temperatures."""
    done = 1.0 if epochs <= 0 else min(1.0, run.progress.epoch_float / epochs)
    return start + done * (end - start)


def dino_cross_entropy(
    teacher: Tensor, student_logits: tuple[Tensor, ...], teacher_index: tuple[int, ...], temp: float
) -> Tensor:
    """Eq. 3: the mean, over pairs (teacher crop ``n`` at view position ``teacher_index[n]``, any
    other view ``j``), of the batch mean of ``H(teacher[n], softmax(student_logits[j] / temp))``.
    """
    log_student = [F.log_softmax(z.float() / temp, dim=-1) for z in student_logits]
    terms = [
        -(probs * log_student[j]).sum(dim=-1).mean()
        for probs, i in zip(teacher, teacher_index, strict=True)
        for j in range(len(log_student))
        if j != i
    ]
    return torch.stack(terms).mean()


class DINOLoss(sslplug.Loss):
    """The cross-entropy of eq. 3 between the teacher's distributions for the global crops and
    the student's for every other crop.

    Logs the mean entropy of the teacher's distributions (``teacher_entropy``, ``log K`` when
    uniform: collapse by centring), the number of prototypes the teacher's argmax uses in the
    batch (``teacher_prototypes``, 1: collapse by sharpening), and the mean KL divergence of
    the student from the teacher (``kl``): each teacher crop is in the same number of pairs, so
    the loss is ``teacher_entropy + kl``. The loss itself rises while the teacher's temperature
    warms up; ``kl`` is what the student drives down.
    """

    collapse_hint = (
        "DINO avoids collapse by centring and sharpening the teacher: check dino.center_momentum, "
        "the teacher temperature and the target update"
    )

    requires = frozenset({"two_views", "projection", TEACHER_DISTRIBUTION})

    def __init__(self, student_temp: float) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assert target is not None  # required capability: dino_teacher_distribution
        teacher = target.extras["teacher_distribution"]
        global_index = views.indices("global")
        if len(global_index) != teacher.shape[0]:
            raise ValueError(
                f"the teacher gave distributions for {teacher.shape[0]} views but the views "
                f"hold {len(global_index)} global crops at positions {global_index}"
            )
        with torch.autocast(teacher.device.type, enabled=False):
            loss = dino_cross_entropy(teacher, outputs.projections, global_index, self.student_temp)
        entropy = -torch.special.xlogy(teacher, teacher).sum(dim=-1).mean()
        used = teacher.argmax(dim=-1).unique().numel()
        metrics = {
            "teacher_entropy": entropy.detach(),
            "kl": (loss - entropy).detach(),
            "teacher_prototypes": torch.tensor(float(used)),
        }
        return sslplug.LossResult(loss, metrics)


class DINOTeacher(sslplug.MomentumTarget):
    """The teacher: an EMA copy of the student's backbone and head, and the centre ``c``.

    ``forward`` (global crops only) returns the teacher's logits and, in
    ``extras["teacher_distribution"]``, ``P_t`` of shape ``(global crops, B, K)``: centred with
    the centre of the earlier steps and sharpened at the temperature of ``run.progress``.
    ``update_from_step`` folds the mean of those logits over the global batch (summed over
    ranks) into the centre after the optimiser step, as the official code updates the centre
    after computing the loss, and ``step`` moves the teacher (EMA rate on a cosine to 1). The
    centre is a buffer, so checkpoints hold it.
    """

    reads = ("global",)
    requires = frozenset({"two_views", "projection"})
    center: Tensor
    provides = frozenset({"target_projection", TEACHER_DISTRIBUTION})

    def __init__(self, encoder: Encoder, settings: DINOSettings, run: RunContext) -> None:
        super().__init__(encoder, settings.momentum_teacher, name="the DINO teacher")
        self.register_buffer("center", torch.zeros(1, encoder.projection_dim))
        self.settings = settings
        self.run = run
        self._temperature = settings.warmup_teacher_temp

    def temperature(self) -> float:
        """``tau_t`` now: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
        ``warmup_teacher_temp_epochs`` epochs, then constant."""
        s = self.settings
        return warmed_up(
            s.warmup_teacher_temp, s.teacher_temp, self.run, s.warmup_teacher_temp_epochs
        )

    def forward(self, views: Views) -> Outputs:
        logits = sslplug.run_by_resolution(self.network, views.images)
        stacked = torch.stack(logits).float()  # (global crops, B, K)
        self._temperature = self.temperature()
        distribution = F.softmax((stacked - self.center) / self._temperature, dim=-1)
        return Outputs(projections=logits, extras={"teacher_distribution": distribution})

    @torch.no_grad()
    def update_from_step(self, outputs: Outputs, views: Views, target: Outputs | None) -> None:
        """``c <- m c + (1 - m) mean(g_t)`` over the global crops of the whole batch (eq. 4),
        from this step's teacher logits (``target.projections``)."""
        if target is None:
            return
        stacked = torch.stack(target.projections).float()
        total = sslplug.all_reduce_sum(stacked.sum(dim=(0, 1)))
        count = stacked.shape[0] * stacked.shape[1]
        batch_center = total / (count * sslplug.world_size())
        self.center.lerp_(batch_center.unsqueeze(0), 1.0 - self.settings.center_momentum)

    @torch.no_grad()
    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, float]:
        tau = self.momentum(step, total_steps)
        super().step(encoder, step, total_steps)
        return {"tau": tau, "teacher_temperature": self._temperature}


def dino_augmentation(settings: DINOSettings, run: RunContext) -> sslplug.Augmentations:
    """DINO's multi-crop from the settings' crops (iBOT and DINOv2 use it with theirs)."""
    return sslplug.multicrop_recipe(
        run.image_size,
        local_crops=settings.local_crops_number,
        local_size=settings.local_crop_size,
        global_scale=settings.global_crops_scale,
        local_scale=settings.local_crops_scale,
        blur_prob=settings.blur_prob,
        solarize_prob=settings.solarize_prob,
    )


@sslplug.hookimpl
def sslplug_settings() -> type:
    return DINOSettings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register(
        TEACHER_DISTRIBUTION,
        "target Outputs.extras['teacher_distribution']: (global crops, B, K) centred, sharpened "
        "teacher distributions over K prototypes (DINO)",
    )


@sslplug.hookimpl
def sslplug_augmentation(settings: DINOSettings, run: RunContext) -> sslplug.Augmentations:
    return dino_augmentation(settings, run)


@sslplug.hookimpl
def sslplug_encoder(
    settings: DINOSettings, run: RunContext, backbone: nn.Module, feature_dim: int
) -> Encoder:
    return DINOEncoder(backbone, feature_dim, settings, run.config.optim.weight_decay)


@sslplug.hookimpl
def sslplug_target_update(
    settings: DINOSettings, run: RunContext, encoder: Encoder
) -> TargetUpdate:
    return DINOTeacher(encoder, settings, run)


@sslplug.hookimpl
def sslplug_loss(settings: DINOSettings) -> sslplug.Loss:
    return DINOLoss(settings.student_temp)
