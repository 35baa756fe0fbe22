"""Masked-patch self-distillation, iBOT's patch loss (Zhou et al. 2022, arXiv:2111.07832, eq. 2),
as a plugin written on sslplug's public API alone.

The student sees two global crops with blockwise masks, a learned mask token at the hidden
patches; an EMA teacher sees the crops whole. At every hidden patch the student matches the
teacher's centred, sharpened distribution over prototypes::

    L = 1/B sum over images of 1/|M| sum over hidden patches i of H(P_t(i), softmax(s(i) / t_s))

Without iBOT's class-token loss the class token learns nothing, so evaluation reads the mean
patch token. Usage::

    sslplug run --plugin masked_tokens --backbone vit_micro
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug

MASKED = "masked_tokens_student"
TEACHER = "masked_tokens_teacher"


@attrs.define
class MaskedTokensSettings:
    """iBOT's defaults (``main_ibot.py``) but for the prototypes: 256 here, 8192 there."""

    prototypes: int = attrs.field(default=256, validator=sslplug.positive)
    mask_ratio: tuple[float, float] = attrs.field(default=(0.1, 0.5), validator=sslplug.scale_range)
    mask_probability: float = attrs.field(default=0.5, validator=sslplug.unit_interval)
    student_temp: float = attrs.field(default=0.1, validator=sslplug.positive)
    teacher_temp: float = attrs.field(default=0.07, validator=sslplug.positive)
    center_momentum: float = attrs.field(default=0.9, validator=sslplug.unit_interval)
    momentum: float = attrs.field(default=0.996, validator=sslplug.unit_interval)


class MaskedTokensEncoder(sslplug.Encoder):
    """A ViT with a mask token and a head on every patch token. Training masks the views;
    in eval mode, where ``EMATeacher`` keeps its copy, nothing is masked."""

    provides = frozenset({MASKED})

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: MaskedTokensSettings):
        vit = sslplug.token_backbone(backbone, "the masked-tokens encoder")
        super().__init__(vit, feature_dim)
        vit.enable_mask_token()  # before the optimiser and the teacher's copy are made
        vit.set_pool("avg")
        self.settings = settings
        self.head = sslplug.MLP(
            feature_dim, [feature_dim], settings.prototypes, activation="gelu", batch_norm=False
        )

    def forward(self, views: sslplug.Views) -> sslplug.Outputs:
        vit = sslplug.token_backbone(self.backbone, "the masked-tokens encoder")
        images = torch.cat(views.images)  # the views of one size, in one call
        extras: dict[str, Tensor] = {}
        if self.training:
            s = self.settings
            grid = vit.grid(images.shape[-2], images.shape[-1])
            extras["mask"], _ = sslplug.sample_blockwise_masks(
                images.shape[0], grid, s.mask_ratio, s.mask_probability, device=images.device
            )
        _, patches = vit.tokens(images, mask=extras.get("mask"))
        extras["patch_logits"] = self.head(patches)  # (views x B, N, prototypes)
        return sslplug.Outputs(extras=extras)


class MaskedPatchLoss(sslplug.Loss):
    """Eq. 2 at the hidden patches; the teacher's centre follows its outputs after each step."""

    requires = frozenset({MASKED, TEACHER})
    center: Tensor

    def __init__(self, settings: MaskedTokensSettings) -> None:
        super().__init__()
        self.settings = settings
        self.register_buffer("center", torch.zeros(1, settings.prototypes))

    def forward(
        self, outputs: sslplug.Outputs, views: sslplug.Views, target: sslplug.Outputs | None
    ) -> sslplug.LossResult:
        assert target is not None  # required capability
        s, mask = self.settings, outputs.extras["mask"]
        student = outputs.extras["patch_logits"][mask]  # (hidden patches, K), row-major
        if student.shape[0] == 0:  # nothing hidden in this batch
            return sslplug.LossResult(outputs.extras["patch_logits"].sum() * 0.0, {})
        teacher_logits = target.extras["patch_logits"][mask]
        teacher = F.softmax((teacher_logits - self.center) / s.teacher_temp, dim=-1)
        entropy = -(teacher * F.log_softmax(student / s.student_temp, dim=-1)).sum(dim=-1)
        weights = (mask / mask.sum(dim=1, keepdim=True).clamp_min(1))[mask]
        loss = (entropy * weights).sum() / mask.shape[0]
        return sslplug.LossResult(loss, {"masked": mask.float().mean()})

    @torch.no_grad()
    def update_from_step(
        self, outputs: sslplug.Outputs, views: sslplug.Views, target: sslplug.Outputs | None
    ) -> None:
        """``c <- m c + (1 - m) mean``: the teacher's logits of every patch, every rank."""
        assert target is not None
        rows = target.extras["patch_logits"].flatten(0, 1)
        mean = sslplug.all_reduce_sum(rows.sum(dim=0)) / (rows.shape[0] * sslplug.world_size())
        self.center.lerp_(mean.unsqueeze(0), 1.0 - self.settings.center_momentum)


@sslplug.hookimpl
def sslplug_settings() -> type:
    return MaskedTokensSettings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register(MASKED, "extras 'mask' (B, N) and 'patch_logits' (B, N, K) of the masked views")
    register(TEACHER, "extras 'patch_logits' (B, N, K) of the whole views")


@sslplug.hookimpl
def sslplug_augmentation(run: sslplug.RunContext) -> sslplug.Augmentations:
    return sslplug.multicrop_recipe(run.image_size, local_crops=0)


@sslplug.hookimpl
def sslplug_encoder(
    settings: MaskedTokensSettings, backbone: nn.Module, feature_dim: int
) -> sslplug.Encoder:
    return MaskedTokensEncoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_target_update(
    settings: MaskedTokensSettings, encoder: sslplug.Encoder
) -> sslplug.TargetUpdate:
    return sslplug.EMATeacher(encoder, settings.momentum, provides=(TEACHER,))


@sslplug.hookimpl
def sslplug_loss(settings: MaskedTokensSettings) -> sslplug.Loss:
    return MaskedPatchLoss(settings)
