"""I-JEPA: the image-based joint-embedding predictive architecture (Assran et al. 2023,
"Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture",
arXiv:2301.08243).

From one large *context* block of an image, a predictor guesses the representations, not the
pixels, of several *target* blocks of the same image; the targets come from a target encoder,
an exponential moving average of the context encoder that sees the whole image (Section 3,
Figure 3)::

    context, B_1..B_M = one context block, M target blocks; target patches leave the context
    s_x   = f_theta(patches[context])                    the context encoder sees only those
    s_y   = layer_norm(f_theta_bar(all patches))         the target encoder, no gradient
    s^_y(j) = g_phi(s_x, mask token + position of j)     for every patch j of every block
    L     = 1/M sum_i mean over j in B_i of loss(s^_y(j), s_y(j))

Predicting in representation space, with blocks large enough to be semantic, learns features
without hand-crafted view augmentations: the only augmentation is a random resized crop. The
collapse that a predictive objective invites is held off by the EMA target encoder (Section 3,
as in BYOL and DINO).

The components, in sslplug's terms: the view generator draws the masks (``Views.targets
["context"]`` and ``["target_blocks"]``, capability ``block_masks``, ``sslplug.sample_block_
masks``); the encoder runs ``ViTBackbone.tokens(images, keep=context)`` and the predictor, and
provides ``block_predictions``; the target update is the EMA target encoder and provides
``block_targets``; the loss reads both. Evaluation reads the mean patch token under
``model.pool=auto``: the paper's linear probes average-pool the last layer (Appendix A.2), and
the class token of a timm ViT is never a target here. I-JEPA needs a backbone with patch
tokens; ``--backbone small`` or a ResNet is refused before the first step.

Usage::

    sslplug run --plugin ijepa --backbone vit_micro
    sslplug run --plugin ijepa --backbone vit_tiny --set ijepa.pred_depth=6
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import Encoder, Outputs, RunContext, TargetUpdate, Views

BLOCK_MASKS = "block_masks"
BLOCK_PREDICTIONS = "block_predictions"
BLOCK_TARGETS = "block_targets"


def _aspect_range(instance: object, attribute: attrs.Attribute, value: Any) -> None:
    low, high = value
    if not 0.0 < low <= high:
        raise sslplug.ConfigError(
            f"{attribute.name} must be a range (low, high) of block height over width with "
            f"0 < low <= high, got {tuple(value)!r}"
        )


def _momentum_range(instance: object, attribute: attrs.Attribute, value: Any) -> None:
    start, end = value
    if not 0.0 <= start <= end <= 1.0:
        raise sslplug.ConfigError(
            f"{attribute.name} must be (start, end) with 0 <= start <= end <= 1, the EMA rate at "
            f"the first and the last step, got {tuple(value)!r}"
        )


def _multiple_of_4(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0 or value % 4:
        raise sslplug.ConfigError(
            f"{attribute.name} must be a positive multiple of 4 (a 2-D sin-cos position "
            f"embedding gives a sine and a cosine to each axis), got {value!r}"
        )


@attrs.define
class IJEPASettings:
    """I-JEPA's recipe (Assran et al. 2023, Section 3 and Appendix A.1; the official
    ``configs/in1k_vith14_ep300.yaml`` and ``src/masks/multiblock.py``); the names are those
    of the official configuration.

    - Masks: ``num_pred_masks`` = 4 target blocks of scale ``pred_mask_scale`` (0.15, 0.2)
      and aspect ratio ``aspect_ratio`` (0.75, 1.5); one context block of scale
      ``enc_mask_scale`` (0.85, 1.0), aspect ratio 1, keeping at least ``min_keep`` = 10
      patches once the targets are removed (Section 3, "Context", "Targets"; config ``mask``).
    - Views: random resized crop of scale ``crop_scale`` (0.3, 1.0), no flip, no colour
      (config ``data``: ``use_horizontal_flip``, ``use_color_distortion`` and
      ``use_gaussian_blur`` false).
    - Target encoder: EMA rate rising linearly from 0.996 to 1 over the run (``ema``;
      Appendix A.1), and its patch tokens layer-normalised (``src/train.py``).
    - Weight decay: a cosine from ``weight_decay`` 0.04 to ``weight_decay_end`` 0.4
      (``weight_decay``, ``final_weight_decay``); AdamW, the core's default optimiser.

    Defaults that differ from the published values, to keep runs on two CPU cores practical:
    the predictor is ``pred_depth`` 4 blocks (12 in the paper) of width ``pred_emb_dim`` 64
    (384) with ``pred_num_heads`` 4 (the encoder's heads in the official code: 16 for
    ViT-H): half the width and the depth of ``vit_micro``, as the paper's 384 is half of
    ViT-B's width. On a 32-px image with 4-px patches the grid is 8x8, so a target block is
    about 3x4 patches and the context about 19 of the 64 patches.

    ``lr_scale`` 0.25: the encoder and predictor learn at a quarter of ``optim.lr`` (5e-4 at the
    core's 2e-3 and batch 256). The official configuration's peak, 1e-3 at batch 2048, is
    1.25e-4 at batch 256 under the linear scaling rule; the core's 2e-3 is sixteen times that,
    and on the default data (``vit_micro``, 15 epochs, seed 0) it left the features below the
    random encoder's (kNN -2.1 points), where a quarter of it gains +15.7 (``docs/benchmarks.md``).
    """

    pred_depth: int = attrs.field(default=4, validator=sslplug.positive)
    pred_emb_dim: int = attrs.field(default=64, validator=_multiple_of_4)
    pred_num_heads: int = attrs.field(default=4, validator=sslplug.positive)
    num_pred_masks: int = attrs.field(default=4, validator=sslplug.positive)
    pred_mask_scale: tuple[float, float] = attrs.field(
        default=(0.15, 0.2), validator=sslplug.scale_range
    )
    aspect_ratio: tuple[float, float] = attrs.field(default=(0.75, 1.5), validator=_aspect_range)
    enc_mask_scale: tuple[float, float] = attrs.field(
        default=(0.85, 1.0), validator=sslplug.scale_range
    )
    min_keep: int = attrs.field(default=10, validator=sslplug.positive)
    crop_scale: tuple[float, float] = attrs.field(default=(0.3, 1.0), validator=sslplug.scale_range)
    ema: tuple[float, float] = attrs.field(default=(0.996, 1.0), validator=_momentum_range)
    weight_decay: float = attrs.field(default=0.04, validator=sslplug.positive)
    weight_decay_end: float = attrs.field(default=0.4, validator=sslplug.non_negative)
    lr_scale: float = attrs.field(default=0.25, validator=sslplug.positive)

    def __attrs_post_init__(self) -> None:
        if self.pred_emb_dim % self.pred_num_heads:
            raise sslplug.ConfigError(
                f"pred_emb_dim {self.pred_emb_dim} must be a multiple of pred_num_heads "
                f"{self.pred_num_heads}: each head gets an equal share of the width"
            )

    def masks(
        self,
        batch: int,
        grid: tuple[int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Context ``(B, K)`` and target blocks ``(B, M, T)`` for a batch on ``grid``."""
        return sslplug.sample_block_masks(
            batch,
            grid,
            num_targets=self.num_pred_masks,
            target_scale=self.pred_mask_scale,
            target_aspect_ratio=self.aspect_ratio,
            context_scale=self.enc_mask_scale,
            min_keep=self.min_keep,
            device=device,
            generator=generator,
        )


class IJEPAViews(sslplug.MultiViewGenerator):
    """The augmented images and, for the first view, I-JEPA's block masks.

    The masks are drawn on the batch's device from torch's global generator (so a resumed run
    draws the same ones), over the patch grid the run's backbone gives for the first view's
    size, read at every call.
    """

    def __init__(
        self, augmentations: sslplug.Augmentations, settings: IJEPASettings, run: RunContext
    ) -> None:
        super().__init__(augmentations)
        self.settings = settings
        self.run = run
        self.requires = frozenset({"normalized_views", "patch_tokens"})
        self.provides = self.provides | {BLOCK_MASKS}

    def forward(self, batch: Tensor, extents: Tensor | None = None) -> Views:
        views = super().forward(batch, extents)
        backbone = sslplug.token_backbone(self.run.backbone, "I-JEPA's block masks")
        grid = backbone.grid(*views.images[0].shape[-2:])
        context, targets = self.settings.masks(views.batch_size, grid, device=batch.device)
        views.targets = {**views.targets, "context": context, "target_blocks": targets}
        return views


class LayerNorm(nn.LayerNorm):
    """The official code's LayerNorm (``src/models/vision_transformer.py``): eps 1e-6."""

    def __init__(self, dim: int, **factory: Any) -> None:  # timm passes device and dtype
        super().__init__(dim, eps=1e-6, **factory)


def _init_weights(module: nn.Module) -> None:
    """The official predictor's initialisation: truncated normal (std 0.02) weights and zero
    biases in linear layers, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class IJEPAPredictor(nn.Module):
    """The narrow ViT ``g_phi`` that predicts target-block representations from the context
    (Section 3, "Prediction"; the official ``VisionTransformerPredictor``).

    The context tokens are mapped to the predictor's width and given the fixed 2-D sin-cos
    embedding of their positions; each target block gets one learned mask token per patch,
    plus the embedding of that patch's position. Every block is predicted in a sequence of its
    own (context, then its mask tokens), so the ``M`` predictions do not see each other; after
    the blocks and a norm, the mask tokens' outputs are projected back to the encoder's width.
    """

    def __init__(self, encoder_dim: int, width: int, depth: int, num_heads: int) -> None:
        # timm (and torchvision under it) loads when I-JEPA is built, not when plugins are listed
        from timm.models.vision_transformer import Block

        super().__init__()
        self.width = width
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.blocks = nn.Sequential(
            *[Block(width, num_heads, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)]
        )
        self.norm = LayerNorm(width)
        self.proj = nn.Linear(width, encoder_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)
        # the official fix_init_weight: the residual branches of block l scaled by 1/sqrt(2 l)
        residual = ("attn.proj.weight", "mlp.fc2.weight")
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                for name, weight in block.named_parameters():
                    if name in residual:
                        weight.div_(math.sqrt(2.0 * layer))

    def forward(
        self, context_tokens: Tensor, context: Tensor, targets: Tensor, grid: tuple[int, int]
    ) -> Tensor:
        """``(B, K, D)`` tokens at the patches ``context`` ``(B, K)`` -> the predictions
        ``(B, M, T, D)`` at the patches ``targets`` ``(B, M, T)`` of ``grid``."""
        b, m = targets.shape[:2]
        k = context.shape[1]
        position = sslplug.sincos_position_embedding(*grid, self.width, context.device)
        x = self.embed(context_tokens) + position[context]
        queries = self.mask_token + position[targets]  # (B, M, T, width)
        x = torch.cat([x.unsqueeze(1).expand(b, m, k, self.width), queries], dim=2)
        x = self.norm(self.blocks(x.flatten(0, 1)))[:, k:]
        return self.proj(x).unflatten(0, (b, m))


class IJEPAEncoder(Encoder):
    """The context encoder (the backbone on the context patches only) and the predictor.

    ``Outputs.predictions[0]`` holds the predictions ``(B, M, T, D)`` for every target block
    of ``Views.images[0]``. ``features`` is the backbone's pooled output: the mean patch token
    when ``model.pool`` is ``auto``. Settings whose masks the run's patch grid cannot hold (a
    context block smaller than ``min_keep``) are refused here, before the first step.
    """

    requires = frozenset({"patch_tokens", BLOCK_MASKS})
    provides = frozenset({BLOCK_PREDICTIONS})

    def __init__(
        self, backbone: nn.Module, feature_dim: int, settings: IJEPASettings, run: RunContext
    ) -> None:
        super().__init__(backbone, feature_dim)
        vit = sslplug.token_backbone(backbone, "I-JEPA's context encoder")
        if run.config.model.pool == "auto":
            vit.set_pool("avg")
        # one draw with a generator of its own: masks the run's patch grid cannot hold fail here,
        # before the first step
        grid = vit.grid(run.image_size, run.image_size)
        try:
            settings.masks(1, grid, generator=torch.Generator().manual_seed(0))
        except ValueError as exc:
            raise sslplug.ComponentMismatchError(
                f"I-JEPA's masks do not fit the {grid[0]}x{grid[1]} patch grid of the backbone "
                f"at {run.image_size} px: {exc}"
            ) from None
        self.predictor = IJEPAPredictor(
            vit.embed_dim, settings.pred_emb_dim, settings.pred_depth, settings.pred_num_heads
        )
        self.settings = settings

    def forward(self, views: Views) -> Outputs:
        vit = sslplug.token_backbone(self.backbone, "I-JEPA's context encoder")
        images = views.images[0]
        context, targets = views.targets["context"], views.targets["target_blocks"]
        _, tokens = vit.tokens(images, keep=context)
        grid = vit.grid(*images.shape[-2:])
        return Outputs(predictions=(self.predictor(tokens, context, targets, grid),))

    def optim_rules(self) -> sslplug.OptimRules:
        """The weight decay on a cosine from ``weight_decay`` to ``weight_decay_end``, as in
        the official ``src/helper.py`` (``CosineWDSchedule``), for encoder and predictor.

        The parameters form one group of weight decay ``weight_decay``, and the core's schedule
        ends it at ``weight_decay_end / weight_decay`` times that
        (``OptimRules.weight_decay_end_factor``, as for DINO, whose recipe is the same). The
        group learns at ``lr_scale`` times ``optim.lr``.
        """
        s = self.settings
        group = sslplug.ParamGroup(
            self, name="ijepa", weight_decay=s.weight_decay, lr_scale=s.lr_scale
        )
        return sslplug.OptimRules(
            groups=(group,), weight_decay_end_factor=s.weight_decay_end / s.weight_decay
        )


class IJEPALoss(sslplug.Loss):
    """The smooth L1 distance between predictions and targets, over every patch of every block.

    The paper writes the average squared L2 distance (Section 3, "Loss"); the official code,
    which trained the published models, uses ``F.smooth_l1_loss`` (``src/train.py``), chosen
    here: with ``beta`` = 1 it is half the squared difference wherever the two differ by less
    than 1, which is most of the time on layer-normalised targets, and the absolute
    difference beyond, which keeps outliers from dominating. The mean runs over every element;
    all blocks have the same size, so it is the average over blocks of each block's mean, as
    the paper's ``1/M sum_i``.

    Logged: ``context_patches`` and ``target_patches``, the patches of each context and each
    block (the official log's ``mask-A`` and ``mask-B``), and ``target_std``, the mean over
    features of the targets' standard deviation over the batch's patches: 1 for layer-normed
    tokens that differ, 0 when the target encoder collapses to one output.
    """

    collapse_hint = (
        "I-JEPA needs its EMA target encoder: check the target update, ijepa.lr_scale and the "
        "learning rate"
    )

    requires = frozenset({BLOCK_PREDICTIONS, BLOCK_TARGETS})

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        assert target is not None  # required capability: block_targets
        prediction = outputs.predictions[0].float()
        goal = target.extras["block_targets"].float()
        loss = F.smooth_l1_loss(prediction, goal)
        metrics = {
            "context_patches": torch.tensor(float(views.targets["context"].shape[1])),
            "target_patches": torch.tensor(float(views.targets["target_blocks"].shape[2])),
            "target_std": goal.detach().flatten(0, 2).std(dim=0).mean(),
        }
        return sslplug.LossResult(loss, metrics)


def gather_blocks(tokens: Tensor, blocks: Tensor) -> Tensor:
    """The tokens ``(B, N, D)`` at the patches ``blocks`` ``(B, M, T)``: ``(B, M, T, D)``."""
    b, m, t = blocks.shape
    index = blocks.reshape(b, m * t, 1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index).reshape(b, m, t, -1)


class IJEPATarget(TargetUpdate):
    """The target encoder: an EMA copy of the backbone that reads the whole first view.

    ``forward`` gives, in ``Outputs.extras["block_targets"]``, its patch tokens (after the
    ViT's final norm) layer-normalised over the feature dimension without affine parameters,
    as the official ``src/train.py`` does, at the target blocks: ``(B, M, T, D)``. ``step``
    moves it by ``theta_bar <- m theta_bar + (1 - m) theta`` with ``m`` rising linearly from
    ``ema[0]`` at the first step to ``ema[1]`` at the last (Appendix A.1).
    """

    requires = frozenset({"patch_tokens", BLOCK_MASKS})
    provides = frozenset({BLOCK_TARGETS})

    def __init__(self, encoder: Encoder, ema: tuple[float, float]) -> None:
        super().__init__()
        vit = sslplug.token_backbone(encoder.backbone, "I-JEPA's target encoder")
        self.network = copy.deepcopy(vit)
        self.network.requires_grad_(False)
        self.ema = tuple(ema)

    def momentum(self, step: int, total_steps: int) -> float:
        """``m`` after optimizer step ``step`` of ``total_steps``."""
        start, end = self.ema
        return start + (end - start) * min(1.0, step / max(1, total_steps))

    def forward(self, views: Views) -> Outputs:
        _, patches = self.network.tokens(views.images[0])
        patches = F.layer_norm(patches, patches.shape[-1:])
        return Outputs(
            extras={"block_targets": gather_blocks(patches, views.targets["target_blocks"])}
        )

    @torch.no_grad()
    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, float]:
        momentum = self.momentum(step, total_steps)
        sslplug.ema_update(self.network, encoder.backbone, momentum)
        return {"momentum": momentum}


@sslplug.hookimpl
def sslplug_settings() -> type:
    return IJEPASettings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register(
        BLOCK_MASKS,
        "Views.targets['context'] (B, K) / ['target_blocks'] (B, M, T): patch indices of the "
        "context and of M target blocks of Views.images[0], disjoint (I-JEPA)",
    )
    register(
        BLOCK_PREDICTIONS,
        "Outputs.predictions[0] (B, M, T, D): predicted representations of every target patch",
    )
    register(
        BLOCK_TARGETS,
        "target Outputs.extras['block_targets'] (B, M, T, D): layer-normed target-encoder "
        "tokens at the target blocks (I-JEPA)",
    )


@sslplug.hookimpl
def sslplug_augmentation(settings: IJEPASettings, run: RunContext) -> sslplug.Augmentations:
    size = run.image_size
    crop = sslplug.RandomResizedCrop(size, scale=settings.crop_scale)
    return sslplug.Augmentations([nn.Sequential(crop, sslplug.Normalization())])


@sslplug.hookimpl
def sslplug_views(
    settings: IJEPASettings, run: RunContext, augmentations: sslplug.Augmentations
) -> sslplug.ViewGenerator:
    return IJEPAViews(augmentations, settings, run)


@sslplug.hookimpl
def sslplug_encoder(
    settings: IJEPASettings, run: RunContext, backbone: nn.Module, feature_dim: int
) -> Encoder:
    return IJEPAEncoder(backbone, feature_dim, settings, run)


@sslplug.hookimpl
def sslplug_target_update(settings: IJEPASettings, encoder: Encoder) -> TargetUpdate:
    return IJEPATarget(encoder, settings.ema)


@sslplug.hookimpl
def sslplug_loss() -> sslplug.Loss:
    return IJEPALoss()
