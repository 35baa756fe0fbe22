"""Vision Transformers (and any other timm model) as backbones.

``--backbone timm:NAME`` builds ``timm.create_model(NAME, num_classes=0)`` with the run's image
size, randomly initialised (nothing is downloaded); ``--backbone vit_tiny`` (and the other
``VIT_PRESETS``) is a timm ViT with a shape fit for small images. timm is the well-kept home of
Vision Transformers: stochastic depth (``model.drop_path_rate``), position embeddings
interpolated for crops of another size, and the token outputs that masked-image methods need.

A ViT backbone is a ``ViTBackbone``. Called on images it gives pooled features ``(B, D)``, as
every backbone does (for kNN, probes and export): the class token or the mean of the patch
tokens after the final norm (``model.pool``). It also gives the tokens themselves::

    prefix, patches = backbone.tokens(images)          # (B, 1, D), (B, N, D)
    prefix, visible = backbone.tokens(images, keep)    # only the patches ``keep`` (B, K) are seen

With ``keep``, patches are dropped *before* the transformer blocks, so the encoder pays only
for what it sees (MAE's encoder, He et al. 2022, Section 3; I-JEPA's context encoder, Assran et
al. 2023). Patches are numbered row-major over the grid ``backbone.grid(height, width)``.

Masked-image methods that keep every patch but hide some (BEiT, iBOT, DINOv2) give the backbone
a learned mask token, once, when they build their encoder, and pass a boolean mask ``(B, N)``::

    backbone.enable_mask_token()                        # before the optimiser is made
    prefix, patches = backbone.tokens(images, mask=mask)  # mask token where ``mask`` is True

A backbone with tokens declares the capability ``patch_tokens``; a method that needs tokens
requires it, and the core refuses ``--backbone small`` or a ResNet for it before the first step.
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from sslplug.errors import ComponentMismatchError, ConfigError

__all__ = [
    "TIMM_PREFIX",
    "VIT_PRESETS",
    "ViTBackbone",
    "build_timm_backbone",
    "default_patch_size",
    "sincos_position_embedding",
    "token_backbone",
]

TIMM_PREFIX = "timm:"

# name -> (timm model, the arguments that give it its shape). The patch size is the run's
# (``model.patch_size``, or ``default_patch_size``): 4 px at 32 px, as in the ViT-CIFAR
# settings of the literature, 16 px at 128 px and more.
VIT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # DeiT-Tiny's shape (Touvron et al. 2021, Table 1): width 192, 12 blocks, 3 heads; 5.4M
    # parameters at 4-px patches
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    # DeiT-Small / ViT-S: width 384, 12 blocks, 6 heads
    "vit_small": ("vit_small_patch16_224", {}),
    # for two CPU cores: width 128, 4 blocks, 4 heads; 0.8M parameters. Not a published shape;
    # it keeps ViT runs on the default data to minutes (docs/benchmarks.md)
    "vit_micro": ("vit_tiny_patch16_224", {"embed_dim": 128, "depth": 4, "num_heads": 4}),
}

POOLS = ("token", "avg")


def default_patch_size(image_size: int) -> int:
    """An eighth of the image side (an 8x8 grid of 64 patches) up to 16 px, the ViT default."""
    return max(2, min(16, image_size // 8))


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` whose pooled features and tokens a method can read.

    Attributes:
        vit: the timm model (no classifier); its ``state_dict`` is what ``sslplug export``
            writes, loadable with ``timm.create_model(timm_name, num_classes=0, **timm_args)``.
        timm_name, timm_args: how it was made.
        pool: ``"token"`` (the class token) or ``"avg"`` (the mean patch token), after the final
            norm: what ``forward`` returns.
        embed_dim, patch_size, num_prefix_tokens: its width, patch side and number of tokens
            before the patches (the class token and any register tokens).
        mask_token: the learned token ``(1, 1, D)`` that replaces masked patches, or ``None``
            until a method asks for it (``enable_mask_token``). Not part of ``vit``: checkpoints
            hold it, exports do not.
    """

    provides = frozenset({"patch_tokens"})
    mask_token: nn.Parameter | None

    def __init__(self, vit: nn.Module, timm_name: str, timm_args: dict[str, Any], pool: str):
        super().__init__()
        self.vit = vit
        self.timm_name = timm_name
        self.timm_args = dict(timm_args)
        timm_vit: Any = vit  # timm's attributes, untyped
        self.embed_dim = int(timm_vit.embed_dim)
        self.patch_size = int(timm_vit.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(timm_vit.num_prefix_tokens)
        self.pool = "token"
        self.set_pool(pool)
        # made only when a method asks, so that encoders saved without one load as they are
        self.register_parameter("mask_token", None)
        self.register_load_state_dict_pre_hook(_mask_token_from_state)

    def set_pool(self, pool: str) -> None:
        if pool not in POOLS:
            raise ConfigError(f"model.pool {pool!r} is not valid; valid: auto, {', '.join(POOLS)}")
        if pool == "token" and not getattr(self.vit, "has_class_token", True):
            raise ConfigError(
                f"model.pool 'token' needs a class token, and {self.timm_name} has none; use "
                f"--set model.pool=avg"
            )
        self.pool = pool

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of patches for images of ``height x width`` (padded up)."""
        p = self.patch_size
        return -(-height // p), -(-width // p)

    def enable_mask_token(self) -> nn.Parameter:
        """The learned mask token ``(1, 1, D)``, made (zeros) on the first call and returned as
        it is on later ones. A method that masks patches calls it when it builds its encoder,
        so that the optimiser, the EMA teacher and checkpoints see it.

        Zeros, as in the official code of iBOT (``models/vision_transformer.py``:
        ``masked_embed``) and DINOv2 (``dinov2/models/vision_transformer.py``: ``mask_token``),
        neither of which initialises it otherwise. It lives beside the timm model, not in it,
        so ``exported_state_dict`` leaves it out.
        """
        if self.mask_token is None:
            weight = next(self.vit.parameters())
            self.mask_token = nn.Parameter(
                torch.zeros(1, 1, self.embed_dim, device=weight.device, dtype=weight.dtype)
            )
        return self.mask_token

    def tokens(
        self, images: Tensor, keep: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The prefix tokens ``(B, P, D)`` and patch tokens ``(B, N, D)`` after the final norm.

        ``keep``: ``(B, K)`` indices of the patches to keep (row-major over ``grid``); the others
        are removed after the position embedding and before the blocks, and the patch tokens
        returned are those ``K``, in the order of ``keep``.

        ``mask``: ``(B, N)`` booleans (row-major over ``grid``, as ``sample_blockwise_masks``
        draws them); the patch embeddings where it is True are replaced by ``mask_token``
        *before* the position embedding is added, so a masked token still knows its place, as
        iBOT (``prepare_tokens``) and DINOv2 (``prepare_tokens_with_masks``) do. Every other
        token is untouched: an all-False mask gives what no mask gives, bit for bit. Needs
        ``enable_mask_token``.
        """
        vit: Any = self.vit
        x = vit.patch_embed(images)
        if mask is not None:
            x = self._put_mask_token(x, mask)
        # timm's position embedding: adds the (interpolated) table, prepends class and register
        # tokens; a private method, the one timm's own forward_features uses
        x = vit._pos_embed(x)
        prefix = self.num_prefix_tokens
        if keep is not None:
            patches = x[:, prefix:]
            index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
            x = torch.cat([x[:, :prefix], torch.gather(patches, 1, index)], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.norm(vit.blocks(x))
        return x[:, :prefix], x[:, prefix:]

    def _put_mask_token(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``, timm's patch embeddings ``(B, H, W, D)`` (or ``(B, N, D)``), with the mask
        token where ``mask`` ``(B, N)`` is True."""
        if self.mask_token is None:
            raise RuntimeError(
                "tokens(images, mask=...) needs the backbone's mask token; call "
                "backbone.enable_mask_token() when the encoder is built, before the optimiser"
            )
        patches = math.prod(x.shape[1:-1])
        if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], patches):
            raise ValueError(
                f"mask must be booleans (B, N) = {(x.shape[0], patches)} for these images, "
                f"row-major over the patch grid; got {mask.dtype} {tuple(mask.shape)}"
            )
        token = self.mask_token.to(x.dtype).view(-1)
        return torch.where(mask.reshape(x.shape[:-1]).unsqueeze(-1), token, x)

    def forward(self, images: Tensor) -> Tensor:
        prefix, patches = self.tokens(images)
        if self.pool == "avg":
            return patches.mean(dim=1)
        return prefix[:, 0]

    def exported_state_dict(self) -> dict[str, Tensor]:
        """The timm model's own state dict (keys without ``vit.``). The mask token, if any, is
        left out: it is training machinery, and timm's model has no place for it."""
        return self.vit.state_dict()


def _mask_token_from_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Before a ``ViTBackbone`` loads a state dict that holds a mask token, make its own (an
    encoder rebuilt for evaluation or export from a masked method's checkpoint)."""
    if f"{prefix}mask_token" in state_dict and isinstance(module, ViTBackbone):
        module.enable_mask_token()


class TimmBackbone(nn.Module):
    """A timm model without tokens (a ConvNet): pooled features only."""

    provides: frozenset[str] = frozenset()

    def __init__(self, net: nn.Module, timm_name: str, timm_args: dict[str, Any]):
        super().__init__()
        self.net = net
        self.timm_name = timm_name
        self.timm_args = dict(timm_args)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def exported_state_dict(self) -> dict[str, Tensor]:
        return self.net.state_dict()


def _timm_name(name: str) -> tuple[str, dict[str, Any]]:
    import timm

    if name in VIT_PRESETS:
        return VIT_PRESETS[name]
    model = name.removeprefix(TIMM_PREFIX)
    if not model or not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"--backbone {name!r}: timm has no model {model!r}{hint} (timm.list_models() lists "
            f"them all), and it is not a preset ({', '.join(VIT_PRESETS)})"
        )
    return model, {}


def _vit_args(
    name: str,
    timm_name: str,
    image_size: int,
    patch_size: int,
    drop_path_rate: float,
    published: bool,
    registers: int,
) -> dict[str, Any]:
    """The arguments a Vision Transformer is made with, the settings checked."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(f"model.drop_path_rate {drop_path_rate} must be in [0, 1)")
    if patch_size < 0 or patch_size > image_size:
        raise ConfigError(
            f"model.patch_size {patch_size} must be between 1 and the image size {image_size} "
            f"(0: the backbone's default)"
        )
    vit_args: dict[str, Any] = {"img_size": image_size}
    if patch_size or name in VIT_PRESETS:
        vit_args["patch_size"] = patch_size or default_patch_size(image_size)
    if registers:
        if published:
            raise ConfigError(
                f"model.registers={registers} with model.pretrained=true: the published weights "
                f"of {timm_name} fix its tokens; choose a timm model published with registers "
                f"(timm:vit_small_patch14_reg4_dinov2.lvd142m) and leave model.registers 0"
            )
        vit_args["reg_tokens"] = registers
    return vit_args


def build_timm_backbone(
    name: str,
    image_size: int,
    patch_size: int = 0,
    drop_path_rate: float = 0.0,
    pool: str = "auto",
    published: bool = False,
    registers: int = 0,
) -> tuple[nn.Module, int]:
    """The backbone ``name`` (a preset or ``timm:NAME``), randomly initialised, and the width of
    its pooled output.

    A Vision Transformer is made for ``image_size`` with ``patch_size`` (0: the preset's
    choice, ``default_patch_size``, or the timm model's own for ``timm:NAME``) and accepts other
    sizes too (local crops): its position embedding is interpolated and the image padded to
    whole patches. ``published``: with the weights timm publishes for the model (resampled by
    timm to this image and patch size), through its own download and cache. ``registers``: that
    many register tokens (timm's ``reg_tokens``) after the class token, for a ViT; 0 keeps the
    model's own (the ``_reg4`` models have four).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    timm_name, args = _timm_name(name)
    args = dict(args)
    vit_args = _vit_args(
        name, timm_name, image_size, patch_size, drop_path_rate, published, registers
    )
    common: dict[str, Any] = {"num_classes": 0, "drop_path_rate": drop_path_rate}

    def create(**more: Any) -> nn.Module:
        if not published:
            return timm.create_model(timm_name, pretrained=False, **common, **args, **more)
        from sslplug.weights import fetch_published, timm_cache

        return fetch_published(
            f"timm:{timm_name}",
            lambda: timm.create_model(timm_name, pretrained=True, **common, **args, **more),
            timm_cache(timm_name),
        )

    try:
        net = create(dynamic_img_size=True, dynamic_img_pad=True, **vit_args)
    except TypeError:  # not a ViT: no image size, patch size or dynamic size to set
        if patch_size or registers:
            setting = f"model.patch_size={patch_size}"
            if not patch_size:
                setting = f"model.registers={registers}"
            raise ConfigError(
                f"{setting}: timm's {timm_name} is not a Vision Transformer; leave it 0"
            ) from None
        net = create()
        return TimmBackbone(net, timm_name, {**args}), _width(net)
    if not isinstance(net, VisionTransformer):
        return TimmBackbone(net, timm_name, {**args, **vit_args}), _width(net)
    has_token = getattr(net, "has_class_token", True)
    chosen = pool if pool != "auto" else ("token" if has_token else "avg")
    backbone = ViTBackbone(net, timm_name, {**args, **vit_args}, chosen)
    return backbone, backbone.embed_dim


@functools.lru_cache(maxsize=32)
def sincos_position_embedding(
    rows: int, cols: int, width: int, device: torch.device | str = "cpu"
) -> Tensor:
    """The fixed 2-D sin-cos position embedding ``(rows * cols, width)`` of a patch grid,
    row-major (timm's ``build_sincos2d_pos_embed``), made once per grid, width and device:
    MAE's decoder and I-JEPA's predictor read it every step. Shared: do not modify it."""
    from timm.layers import build_sincos2d_pos_embed

    with torch.inference_mode(False), torch.no_grad():
        return build_sincos2d_pos_embed([rows, cols], width, device=torch.device(device))


def _width(net: nn.Module) -> int:
    """The width of a timm model's pooled features (``num_features``, timm's convention)."""
    return int(getattr(net, "num_features"))  # noqa: B009 - an attribute typed Tensor | Module


def token_backbone(backbone: nn.Module | None, who: str) -> ViTBackbone:
    """``backbone`` as a ``ViTBackbone``, or a ``ComponentMismatchError`` saying that ``who``
    needs patch tokens and which backbones give them."""
    if isinstance(backbone, ViTBackbone):
        return backbone
    raise ComponentMismatchError(
        f"{who} needs the patch tokens of a Vision Transformer, and the backbone "
        f"{type(backbone).__name__} gives pooled features only; choose one with tokens: "
        f"--backbone {' | '.join(VIT_PRESETS)} or --backbone timm:NAME for a timm ViT"
    )
