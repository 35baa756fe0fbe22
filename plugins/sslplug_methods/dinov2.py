"""DINOv2: learning robust visual features without supervision (Oquab et al. 2024,
arXiv:2304.07193).

The recipe of Section 4 on the iBOT loss (``sslplug_methods.ibot``, whose parts it uses): DINO's
loss on the class token and iBOT's on masked patch tokens, with

- **KoLeo** (Sablayrolles et al. 2019) on the student's class tokens of each global crop,
  summed over the two crops, with weight 0.1 (``sslplug.koleo_loss``, which never gives NaN or
  inf, at batches of 1 or 2 or with duplicates);
- **Sinkhorn-Knopp centring** as an option (``centering = "sinkhorn_knopp"``): the teacher's
  targets are the balanced assignments of 3 iterations (``sslplug.sinkhorn_knopp``, the same
  function SwAV uses) instead of a softmax after a running centre;
- **register tokens** (Darcet et al. 2024, "Vision Transformers need registers",
  arXiv:2309.16588): ``--set model.registers=4`` gives the ViT four more learned tokens beside
  the class token, which the blocks may use as scratch space; the class token stays what
  evaluation reads;
- the patch head's centre follows the teacher's outputs at the masked patches only.

The official code read is facebookresearch/dinov2 at commit b8931f7
(``dinov2/configs/ssl_default_config.yaml``, ``dinov2/train/ssl_meta_arch.py``,
``dinov2/loss/``).

Usage::

    sslplug run --plugin dinov2 --backbone vit_micro --set model.registers=4
    sslplug run --plugin dinov2 --backbone vit_micro --set dinov2.centering=sinkhorn_knopp
"""

from __future__ import annotations

import attrs
from torch import nn

import sslplug
from sslplug import Encoder, RunContext, TargetUpdate
from sslplug_methods.dino import dino_augmentation
from sslplug_methods.ibot import IBOTLoss, IBOTSettings, MaskedTokenEncoder, teacher


@attrs.define
class DINOv2Settings(IBOTSettings):
    """DINOv2's recipe (``dinov2/configs/ssl_default_config.yaml`` at commit b8931f7), on the
    CPU scale of DINO's and iBOT's settings, whose fields it shares.

    As the official defaults: ``koleo_weight`` 0.1, ``momentum_teacher`` 0.992 (cosine to 1),
    ``global_crops_scale`` (0.32, 1) and ``local_crops_scale`` (0.05, 0.32), the mask ratio
    [0.1, 0.5] on half the images (``mask_sample_probability`` 0.5), one head for class and
    patch tokens (``ibot.separate_head: false``), the teacher's temperatures 0.04 to 0.07, weight
    decay 0.04 to 0.4, clipping at 3, the last layer frozen for the first epoch,
    ``centering = "centre"`` (the configuration's ``centering``; ``sinkhorn_knopp`` is the
    other choice, used by the ViT-g run).

    Different, to keep runs on two CPU cores practical: 1024 prototypes (65536), hidden width
    512 (2048), bottleneck 128 (256), 6 local crops (8), teacher-temperature warm-up 5 epochs
    (30 of 100). Not taken: the layer-wise learning-rate decay 0.9 and the patch embedding's
    rate multiplier 0.2 (``optim.layer_decay`` gives the first), LayerScale and stochastic
    depth (``model.drop_path_rate`` gives the second; the teacher never uses it), the
    learning-rate scaling with the square root of the batch.
    """

    global_crops_scale: tuple[float, float] = attrs.field(
        default=(0.32, 1.0), validator=sslplug.scale_range
    )
    local_crops_scale: tuple[float, float] = attrs.field(
        default=(0.05, 0.32), validator=sslplug.scale_range
    )
    momentum_teacher: float = attrs.field(default=0.992, validator=sslplug.unit_interval)
    koleo_weight: float = attrs.field(default=0.1, validator=sslplug.non_negative)


class DINOv2Encoder(MaskedTokenEncoder):
    """The student: iBOT's (a ViT with a mask token, one DINO head on class and patch tokens),
    its class tokens of the global crops KoLeo's input. A ConvNet is refused naming DINOv2."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: DINOv2Settings) -> None:
        super().__init__(backbone, feature_dim, settings, "DINOv2's encoder")


class DINOv2Loss(IBOTLoss):
    """iBOT's loss with KoLeo's weight from the settings and the patch centre following the
    teacher at the masked patches only, as ``dinov2/train/ssl_meta_arch.py`` updates it."""

    collapse_hint = (
        "DINOv2 avoids collapse by centring (or Sinkhorn-Knopp) and sharpening the teacher, and "
        "spreads class tokens with KoLeo: check dinov2.centering, the teacher temperatures, "
        "dinov2.koleo_weight and the target update"
    )
    centre_masked_only = True


@sslplug.hookimpl
def sslplug_settings() -> type:
    return DINOv2Settings


@sslplug.hookimpl
def sslplug_augmentation(settings: DINOv2Settings, run: RunContext) -> sslplug.Augmentations:
    return dino_augmentation(settings, run)


@sslplug.hookimpl
def sslplug_encoder(settings: DINOv2Settings, backbone: nn.Module, feature_dim: int) -> Encoder:
    return DINOv2Encoder(backbone, feature_dim, settings)


@sslplug.hookimpl
def sslplug_target_update(settings: DINOv2Settings, encoder: Encoder) -> TargetUpdate:
    return teacher(encoder, settings)


@sslplug.hookimpl
def sslplug_loss(settings: DINOv2Settings, run: RunContext, encoder: Encoder) -> sslplug.Loss:
    return DINOv2Loss(settings, run, encoder)
