"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al. 2022, arXiv:2111.07832).

DINO on the class token, plus masked image modelling on the patch tokens, with the teacher as
the tokenizer (Section 3.2, eq. 1 and 2). The student sees the two global crops with some
patches replaced by a learned mask token (blockwise masks, as BEiT draws them) and the local
crops whole; the teacher, an exponential moving average of the student, sees the global crops
whole. Both the class token and every patch token go through a DINO head onto prototypes::

    L_cls   = 1/|pairs| sum over teacher crop u, student crop v != u of
              H(P_t(x_u)[cls], P_s(x_v)[cls])
    L_patch = 1/|global| sum over global crop u of
              1/B sum over images of 1/|M| sum over masked patches i in M of
                  H(P_t(x_u)[i], P_s(mask(x_u))[i])
    L = lambda1 L_cls + lambda2 L_patch (+ koleo_weight KoLeo, DINOv2)

``P_t`` is the teacher's softmax after centring and sharpening (a running centre per head, as
DINO's eq. 4, with ``teacher_temp`` for the class token and ``teacher_patch_temp`` for the
patches), or, with ``centering = "sinkhorn_knopp"``, Sinkhorn-Knopp's balanced assignments
(DINOv2). An image with no masked patch adds 0 to ``L_patch`` (``pred_ratio`` 0 for half the
images in the official code). The official code read is bytedance/ibot at commit da316d8
(``main_ibot.py``, ``loader.py``, ``models/head.py``).

The DINOv2 recipe (``sslplug_methods.dinov2``) is this loss plus KoLeo on the student's class
tokens, the Sinkhorn-Knopp option and register tokens (``model.registers``).

The parts are the core's: ``ViTBackbone.tokens(images, mask=...)`` puts the mask token,
``sslplug.sample_blockwise_masks`` draws the masks, ``sslplug.EMATeacher`` is the teacher, and
the centres follow the teacher's outputs in ``IBOTLoss.update_from_step``.

Usage::

    sslplug run --plugin ibot --backbone vit_micro
    sslplug run --plugin ibot --backbone vit_micro --augmentation dino
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import Encoder, Outputs, RunContext, TargetUpdate, Views
from sslplug_methods.dino import (
    DINOHead,
    DINOSettings,
    dino_augmentation,
    dino_cross_entropy,
    dino_optim_rules,
    warmed_up,
)

MASKED_PATCHES = "masked_patch_logits"
TEACHER_PATCHES = "teacher_patch_logits"


@attrs.define
class IBOTSettings(DINOSettings):
    """iBOT's recipe (Zhou et al. 2022, Appendix A and the official ``main_ibot.py`` and README
    command for ViT-S/16), on the CPU scale of DINO's settings, whose fields it shares (see
    ``DINOSettings`` for the crops, the head's widths and the schedules).

    The patch head, the masks and the loss weights:

    - ``shared_head`` true: one head for the class and patch tokens, as the README's ViT-S/16
      command (``--shared_head true``); false gives the patch tokens a head of their own with
      ``patch_out_dim`` prototypes.
    - ``mask_ratio`` [0.1, 0.5] for ``mask_probability`` 0.5 of the images (the README's
      ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: half the images unmasked, half uniform in
      0.3 +- 0.2), blockwise with ``min_block_patches`` 4 (``(min(H, W) // 3) ** 2`` on an 8x8
      grid);
    - ``warmup_teacher_patch_temp`` 0.04 to ``teacher_patch_temp`` 0.07 over the same epochs as
      the class token's; ``lambda1 = lambda2 = 1``.
    - ``centering``: ``centre`` (a running centre per head, DINO's) or ``sinkhorn_knopp``
      (DINOv2's alternative).

    Defaults that differ from the published values, to keep runs on two CPU cores practical:
    ``out_dim``/``patch_out_dim`` 1024 (8192), ``hidden_dim`` 512 (2048), ``bottleneck_dim`` 128
    (256), ``local_crops_number`` 6 (10), ``warmup_teacher_temp_epochs`` 5 (30 of 800).
    ``use_bn_in_head`` is false as in the official code (DINO's CPU preset turns it on for the
    small ConvNet), ``global_crops_scale`` (0.25, 1) and ``local_crops_scale`` (0.05, 0.25) as
    the README's command; ``teacher_temp`` 0.07 as that command (0.04 is ``main_ibot.py``'s
    default). ``norm_last_layer`` stays true (the command uses false for ViT-S, a choice the
    paper ties to stability at 800 epochs).
    """

    use_bn_in_head: bool = False
    global_crops_scale: tuple[float, float] = attrs.field(
        default=(0.25, 1.0), validator=sslplug.scale_range
    )
    local_crops_scale: tuple[float, float] = attrs.field(
        default=(0.05, 0.25), validator=sslplug.scale_range
    )
    shared_head: bool = True
    patch_out_dim: int = attrs.field(default=1024, validator=sslplug.positive)
    mask_ratio: tuple[float, float] = attrs.field(default=(0.1, 0.5), validator=sslplug.scale_range)
    mask_probability: float = attrs.field(default=0.5, validator=sslplug.unit_interval)
    min_block_patches: int = attrs.field(default=4, validator=sslplug.positive)
    warmup_teacher_patch_temp: float = attrs.field(default=0.04, validator=sslplug.positive)
    teacher_patch_temp: float = attrs.field(default=0.07, validator=sslplug.positive)
    lambda1: float = attrs.field(default=1.0, validator=sslplug.non_negative)
    lambda2: float = attrs.field(default=1.0, validator=sslplug.non_negative)
    koleo_weight: float = attrs.field(default=0.0, validator=sslplug.non_negative)
    centering: Literal["centre", "sinkhorn_knopp"] = "centre"


class MaskedTokenEncoder(sslplug.Encoder):
    """The student: a ViT with a mask token, and DINO heads on its class and patch tokens.

    In training mode the global crops are masked (``sample_blockwise_masks``, the ratios drawn
    over the global crops of the batch together, as DINOv2's collate does) and ``forward``
    returns in ``extras``, for the ``G`` global crops: ``masks`` ``(G, B, N)``, ``class_tokens``
    ``(G, B, D)`` (KoLeo's input) and the patch head's logits at the masked positions only,
    ``masked_patch_logits`` ``(masked patches, K)`` in the order of ``masks``' True entries
    (row-major over crop, image, patch). In eval mode, the teacher's (``EMATeacher`` keeps its
    copy there), nothing is masked and ``patch_logits`` ``(G, B, N, K)`` of every patch come
    back. The global crops share one size, as multi-crop makes them.
    ``projections`` are the class-token logits of every view.
    """

    provides = frozenset({"projection", MASKED_PATCHES})

    def __init__(
        self, backbone: nn.Module, feature_dim: int, settings: IBOTSettings, who: str
    ) -> None:
        vit = sslplug.token_backbone(backbone, who)
        super().__init__(vit, feature_dim)
        vit.enable_mask_token()
        self.settings = settings
        self.head = DINOHead(feature_dim, settings)
        self.patch_head = (
            self.head
            if settings.shared_head
            else DINOHead(feature_dim, settings, out_dim=settings.patch_out_dim)
        )
        self.projection_dim = settings.out_dim
        self.patch_dim = settings.out_dim if settings.shared_head else settings.patch_out_dim

    @property
    def vit(self) -> sslplug.ViTBackbone:
        """The backbone, a ``ViTBackbone`` (checked when built)."""
        return sslplug.token_backbone(self.backbone, "the encoder")

    def heads(self) -> list[DINOHead]:
        return [self.head] if self.patch_head is self.head else [self.head, self.patch_head]

    def masks(self, views: Views, global_index: Sequence[int]) -> dict[int, Tensor]:
        """The blockwise masks of the global crops, by view position (none in eval mode)."""
        s = self.settings
        if not self.training or not global_index or s.mask_probability == 0:
            return {}
        first = views.images[global_index[0]]
        grid = self.vit.grid(first.shape[-2], first.shape[-1])
        batch = first.shape[0]
        mask, _ = sslplug.sample_blockwise_masks(
            batch * len(global_index),
            grid,
            mask_ratio=s.mask_ratio,
            mask_probability=s.mask_probability,
            min_block_patches=s.min_block_patches,
            device=first.device,
        )
        return dict(zip(global_index, mask.split(batch), strict=True))

    def tokens(
        self, images: Sequence[Tensor], masks: dict[int, Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Class tokens ``(B, D)`` and patch tokens ``(B, N, D)`` of every view, one backbone
        call per image size."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, view in enumerate(images):
            by_shape.setdefault(tuple(view.shape[1:]), []).append(i)
        cls: list[Tensor] = [images[0]] * len(images)
        patches: list[Tensor] = [images[0]] * len(images)
        for index in by_shape.values():
            batch = torch.cat([images[i] for i in index])
            mask = None
            if any(i in masks for i in index):
                n = self.vit.grid(batch.shape[-2], batch.shape[-1])
                empty = torch.zeros(
                    images[index[0]].shape[0], n[0] * n[1], dtype=torch.bool, device=batch.device
                )
                mask = torch.cat([masks.get(i, empty) for i in index])
            prefix, tokens = self.vit.tokens(batch, mask=mask)
            sizes = [images[i].shape[0] for i in index]
            for i, c, p in zip(index, prefix[:, 0].split(sizes), tokens.split(sizes), strict=True):
                cls[i], patches[i] = c, p
        return cls, patches

    def forward(self, views: Views) -> Outputs:
        global_index = views.indices("global")
        masks = self.masks(views, global_index)
        cls, patches = self.tokens(views.images, masks)
        sizes = [c.shape[0] for c in cls]
        logits = self.head(torch.cat(cls)).split(sizes)
        pooled = cls if self.vit.pool == "token" else [p.mean(dim=1) for p in patches]
        extras = {"class_tokens": torch.stack([cls[i] for i in global_index])}
        tokens = torch.stack([patches[i] for i in global_index])  # (G, B, N, D)
        if masks:
            mask = torch.stack([masks[i] for i in global_index])
            extras["masks"] = mask
            extras["masked_patch_logits"] = self.patch_head(tokens[mask])
        else:
            every = self.patch_head(tokens.flatten(0, 2))
            extras["patch_logits"] = every.view(*tokens.shape[:3], -1)
        return Outputs(features=tuple(pooled), projections=logits, extras=extras)

    def optim_rules(self) -> sslplug.OptimRules:
        """DINO's rules (``dino_optim_rules``), with the last layer of each head frozen."""
        return dino_optim_rules(self, self.heads(), self.settings)


def masked_patch_cross_entropy(
    teacher: Tensor, student_logits: Tensor, mask: Tensor, temp: float
) -> Tensor:
    """iBOT's patch loss for one global crop: the mean over the ``B`` images of the mean over
    an image's masked patches of ``H(teacher, softmax(student_logits / temp))``; an image with
    no masked patch adds 0. ``teacher`` and ``student_logits`` are ``(M, K)``, one row per
    masked patch in the order of ``mask`` ``(B, N)``'s True entries (row-major)."""
    log_student = F.log_softmax(student_logits.float() / temp, dim=-1)
    entropy = -(teacher * log_student).sum(dim=-1)
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1)
    weights = (mask / counts)[mask]
    return (entropy * weights).sum() / mask.shape[0]


def _entropy(probs: Tensor) -> Tensor:
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()


class IBOTLoss(sslplug.Loss):
    """``lambda1 L_cls + lambda2 L_patch + koleo_weight KoLeo`` (see the module), with the
    teacher's centring and sharpening: the centres are buffers here (``center`` for the class
    token, ``patch_center`` for the patches), moved in ``update_from_step`` by the teacher's
    outputs of the step (``c <- m c + (1 - m) mean``, over ranks), as DINO's eq. 4.

    Logs ``cls_loss``, ``patch_loss``, ``koleo`` (unweighted), the teacher's entropies
    (``teacher_entropy``, ``teacher_patch_entropy``; ``log K`` when uniform: collapse by
    centring), the prototypes the teacher's argmax uses (``teacher_prototypes``; 1: collapse by
    sharpening), the fraction of patches masked, and the teacher's temperatures.
    """

    collapse_hint = (
        "iBOT avoids collapse by centring and sharpening the teacher: check the centering "
        "setting, center_momentum, the teacher temperatures and the target update"
    )
    requires = frozenset({"two_views", "projection", MASKED_PATCHES, TEACHER_PATCHES})
    center: Tensor
    patch_center: Tensor
    # DINOv2 centres the patch head on the masked patches' teacher outputs, iBOT on all of them
    centre_masked_only = False

    def __init__(self, settings: IBOTSettings, run: RunContext, encoder: Encoder) -> None:
        super().__init__()
        self.settings = settings
        self.run = run
        patch_dim = int(getattr(encoder, "patch_dim", encoder.projection_dim))
        self.register_buffer("center", torch.zeros(1, encoder.projection_dim))
        self.register_buffer("patch_center", torch.zeros(1, patch_dim))

    def temperatures(self) -> tuple[float, float]:
        """The teacher's temperatures now (class token, patches): linear from the warm-up
        values over ``warmup_teacher_temp_epochs`` epochs, then constant."""
        s, run, warm = self.settings, self.run, self.settings.warmup_teacher_temp_epochs
        cls = warmed_up(s.warmup_teacher_temp, s.teacher_temp, run, warm)
        return cls, warmed_up(s.warmup_teacher_patch_temp, s.teacher_patch_temp, run, warm)

    def distribution(self, logits: Tensor, centre: Tensor, temp: float) -> Tensor:
        """The teacher's targets for rows of ``logits`` ``(n, K)``."""
        if self.settings.centering == "sinkhorn_knopp":
            return sslplug.sinkhorn_knopp(logits, temp)
        return F.softmax((logits.float() - centre) / temp, dim=-1)

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assert target is not None  # required capability: teacher_patch_logits
        s = self.settings
        global_index = views.indices("global")
        teacher_logits = torch.stack(target.projections).float()  # (global crops, B, K)
        if len(global_index) != teacher_logits.shape[0]:
            raise ValueError(
                f"the teacher gave logits for {teacher_logits.shape[0]} views but the views "
                f"hold {len(global_index)} global crops at positions {global_index}"
            )
        cls_temp, patch_temp = self.temperatures()
        with torch.autocast(teacher_logits.device.type, enabled=False):
            teacher = self.distribution(teacher_logits.flatten(0, 1), self.center, cls_temp)
            teacher = teacher.view_as(teacher_logits)
            cls_loss = dino_cross_entropy(
                teacher, outputs.projections, global_index, s.student_temp
            )
            patch_loss, patch_entropy, masked = self._patch_loss(outputs, target, patch_temp)
            koleo = torch.stack(
                [sslplug.koleo_loss(t) for t in outputs.extras["class_tokens"]]
            ).sum()
        loss = s.lambda1 * cls_loss + s.lambda2 * patch_loss + s.koleo_weight * koleo
        metrics = {
            "cls_loss": cls_loss.detach(),
            "patch_loss": patch_loss.detach(),
            "koleo": koleo.detach(),
            "teacher_entropy": _entropy(teacher).detach(),
            "teacher_patch_entropy": patch_entropy,
            "teacher_prototypes": torch.tensor(float(teacher.argmax(dim=-1).unique().numel())),
            "masked": masked,
            "teacher_temperature": torch.tensor(cls_temp),
            "teacher_patch_temperature": torch.tensor(patch_temp),
        }
        return sslplug.LossResult(loss, metrics)

    def _patch_loss(
        self, outputs: Outputs, target: Outputs, temp: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``L_patch``, the teacher's mean entropy on the masked patches, the masked fraction."""
        masks = outputs.extras.get("masks")
        if masks is None:  # nothing masked (mask_probability 0): the class-token loss alone
            zero = outputs.projections[0].sum() * 0.0
            return zero, torch.tensor(0.0), torch.tensor(0.0)
        terms, entropies = [], []
        counts = masks.flatten(1).sum(dim=1).tolist()
        students = outputs.extras["masked_patch_logits"].split(counts)
        for mask, student, every in zip(
            masks, students, target.extras["patch_logits"], strict=True
        ):
            teacher = self.distribution(every[mask], self.patch_center, temp)
            temp_s = self.settings.student_temp
            terms.append(masked_patch_cross_entropy(teacher, student, mask, temp_s))
            if teacher.shape[0]:
                entropies.append(_entropy(teacher))
        masked = masks.float().mean()
        entropy = torch.stack(entropies).mean() if entropies else torch.tensor(0.0)
        return torch.stack(terms).mean(), entropy.detach(), masked

    @torch.no_grad()
    def update_from_step(self, outputs: Outputs, views: Views, target: Outputs | None) -> None:
        """The centres follow the teacher's outputs of this step (with ``centering = "centre"``):
        the class-token logits of the global crops, and the patch logits of every patch (iBOT)
        or of the masked ones (DINOv2), averaged over the batch of every rank."""
        if target is None or self.settings.centering != "centre":
            return
        momentum = self.settings.center_momentum
        logits = torch.stack(target.projections).float()
        _follow(self.center, logits.flatten(0, -2), momentum)
        every = target.extras["patch_logits"]  # (G, B, N, K)
        masks = outputs.extras.get("masks")
        rows = (
            every[masks] if self.centre_masked_only and masks is not None else every.flatten(0, 2)
        )
        _follow(self.patch_center, rows.float(), momentum)


def _follow(centre: Tensor, rows: Tensor, momentum: float) -> None:
    """``centre <- m centre + (1 - m) mean(rows)``, the mean over the rows of every rank."""
    total = sslplug.all_reduce_sum(torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])]))
    if total[-1] > 0:
        centre.lerp_((total[:-1] / total[-1]).unsqueeze(0), 1.0 - momentum)


def teacher(encoder: Encoder, settings: IBOTSettings) -> TargetUpdate:
    """The teacher: an ``EMATeacher`` of the whole student (heads and mask token included), in
    eval mode, on the global crops; its EMA rate on a cosine from ``momentum_teacher`` to 1."""
    return sslplug.EMATeacher(
        encoder,
        settings.momentum_teacher,
        reads=("global",),
        provides=("target_projection", TEACHER_PATCHES),
    )


def register_capabilities(register: Callable[[str, str], None]) -> None:
    register(
        MASKED_PATCHES,
        "encoder Outputs.extras: 'masks' (G, B, N) of the G global crops, 'masked_patch_logits' "
        "(masked patches, K) at those masks, 'class_tokens' (G, B, D) (iBOT, DINOv2)",
    )
    register(
        TEACHER_PATCHES,
        "target Outputs: class-token logits per global crop in projections, and "
        "extras['patch_logits'] (G, B, N, K) of every patch (iBOT, DINOv2)",
    )


@sslplug.hookimpl
def sslplug_settings() -> type:
    return IBOTSettings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register_capabilities(register)


@sslplug.hookimpl
def sslplug_augmentation(settings: IBOTSettings, run: RunContext) -> sslplug.Augmentations:
    return dino_augmentation(settings, run)


@sslplug.hookimpl
def sslplug_encoder(settings: IBOTSettings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return MaskedTokenEncoder(backbone, feature_dim, settings, "iBOT's encoder")


@sslplug.hookimpl
def sslplug_target_update(settings: IBOTSettings, encoder: Encoder) -> TargetUpdate:
    return teacher(encoder, settings)


@sslplug.hookimpl
def sslplug_loss(settings: IBOTSettings, run: RunContext, encoder: Encoder) -> sslplug.Loss:
    return IBOTLoss(settings, run, encoder)
