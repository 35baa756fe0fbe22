"""MAE: masked autoencoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners",
arXiv:2111.06377).

A Vision Transformer sees a random quarter of the patches of each image; a light decoder gets
its tokens back in place, a learned mask token at every hidden position, and predicts the pixels
of every patch. The loss is the mean squared error on the *hidden* patches only (Section 3)::

    keep, masked = random split of the N patches, |masked| = round(mask_ratio * N)
    latent       = encoder(patches[keep])                   (the hidden ones never enter it)
    prediction   = decoder(latent with mask tokens at masked, + 2-D sin-cos positions)
    L            = mean over b and k in masked of || prediction[b, k] - target[b, k] ||^2 / D

with ``target`` each patch's pixels, normalised over the patch itself (``norm_pix_loss``, the
paper's best, Table 1c). The encoder pays only for the visible quarter, so MAE trains a large
ViT at a fraction of the cost of seeing every patch; the masking is what makes the task hard
enough to need semantics (Section 4.1, Figure 5).

The components, in sslplug's terms: the view generator draws the mask
(``Views.targets["keep"]`` and ``["masked"]``, the core's capability ``patch_mask``); the
encoder runs ``ViTBackbone.tokens(images, keep)`` and the decoder and provides this plugin's
capability ``pixel_predictions``; the loss reads both. Evaluation reads the backbone's pooled
features, with ``model.pool=auto`` its class token: the token the paper's linear probe uses
(Appendix A.1: an auxiliary class token in the encoder). MAE needs a backbone with patch
tokens; ``--backbone small`` or a ResNet is refused before the first step.

Usage::

    sslplug run --plugin mae --backbone vit_micro
    sslplug run --plugin mae --backbone vit_tiny --set mae.mask_ratio=0.5
"""

from __future__ import annotations

from collections.abc import Callable
from math import isqrt, lcm

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import Encoder, Outputs, RunContext, Views

PIXEL_PREDICTIONS = "pixel_predictions"


def _mask_ratio(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise sslplug.ConfigError(
            f"{attribute.name} must be above 0 and below 1 (some patches hidden for the loss, "
            f"some seen by the encoder), got {value!r}"
        )


@attrs.define
class MAESettings:
    """MAE's pre-training recipe (He et al. 2022, Section 4, Appendix A.1, and the official
    ``main_pretrain.py`` / ``models_mae.py``), with the decoder narrowed for CPU runs.

    - ``mask_ratio`` 0.75: the share of patches hidden, per image (Section 4.1, Figure 5).
    - ``norm_pix_loss`` true: targets normalised per patch (Table 1c, the paper's best).
    - ``crop_scale`` (0.2, 1): random resized crop and horizontal flip, nothing else
      (Table 1e; ``main_pretrain.py`` crops with scale 0.2-1).
    - The decoder: ``decoder_depth`` 2 blocks of width ``decoder_embed_dim`` 64 with
      ``decoder_num_heads`` 4; the paper's is 8 blocks of width 512 with 16 heads for every
      encoder size (Table 1a-b). Narrowed for two CPU cores: the paper's decoder costs about a
      third of ViT-L's encoder per image and more than ViT-B's; 2 x 64 wide over all 64 patches
      costs about half of ``vit_micro``'s encoder (4 x 128 wide over 16 visible patches). Two
      blocks, not one: Table 1a finds a deeper decoder better for linear probing (65.5% with 1
      block, 70.0% with 2, 73.5% with 8), and the kNN monitor is such a probe.
    - ``weight_decay`` 0.05 (Appendix A.1, Table 8), applied to the encoder and decoder
      whatever ``optim.weight_decay`` is (``MAEEncoder.optim_rules``).

    What a plugin cannot set, and what to set instead: the paper trains with AdamW of betas
    (0.9, 0.95) (the core's AdamW keeps torch's (0.9, 0.999)), a learning rate of
    ``1.5e-4 x batch / 256`` (``--set optim.lr=1.5e-4`` at the core's batch of 256) and a
    40-epoch warm-up of 800 (``--set optim.warmup_epochs=...``; the core's default is 1 of 15).
    """

    mask_ratio: float = attrs.field(default=0.75, validator=_mask_ratio)
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = attrs.field(default=(0.2, 1.0), validator=sslplug.scale_range)
    decoder_embed_dim: int = attrs.field(default=64, validator=sslplug.positive)
    decoder_depth: int = attrs.field(default=2, validator=sslplug.positive)
    decoder_num_heads: int = attrs.field(default=4, validator=sslplug.positive)
    weight_decay: float = attrs.field(default=0.05, validator=sslplug.non_negative)

    def __attrs_post_init__(self) -> None:
        width, heads = self.decoder_embed_dim, self.decoder_num_heads
        if width % 4 or width % heads:
            raise sslplug.ConfigError(
                f"decoder_embed_dim {width} must be a multiple of 4 (the 2-D sin-cos position "
                f"embedding has a sine and a cosine quarter for each axis) and of "
                f"decoder_num_heads {heads}: a multiple of {lcm(4, heads)}"
            )


class MaskedViewGenerator(sslplug.MultiViewGenerator):
    """The augmented view(s) and a random mask over the patches of ``Views.images[0]``.

    The mask is drawn batched on the device from torch's global random state
    (``sslplug.random_patch_mask``: hidden patches chosen uniformly and independently per
    image), so a resumed run draws the same masks. The grid is the run's backbone's for the
    view's size, read at every call (``run.backbone``).
    """

    requires = frozenset({"normalized_views", "patch_tokens"})

    def __init__(self, augmentations: sslplug.Augmentations, mask_ratio: float, run: RunContext):
        super().__init__(augmentations)
        self.provides = self.provides | {"patch_mask"}
        self.mask_ratio = mask_ratio
        self.run = run

    def forward(self, batch: Tensor, extents: Tensor | None = None) -> Views:
        views = super().forward(batch, extents)
        images = views.images[0]
        backbone = sslplug.token_backbone(self.run.backbone, "MAE's masking")
        rows, cols = backbone.grid(images.shape[-2], images.shape[-1])
        keep, masked = sslplug.random_patch_mask(
            images.shape[0], rows * cols, self.mask_ratio, device=images.device
        )
        views.targets["keep"] = keep
        views.targets["masked"] = masked
        return views


class MAEDecoder(nn.Module):
    """The light decoder (Section 3, "MAE decoder"): a linear map from the encoder's width to
    its own, the mask token at every hidden patch, fixed 2-D sin-cos position embeddings (none
    on the class token), transformer blocks, a norm and a linear map to each patch's pixels.
    The position embedding is ``sslplug.sincos_position_embedding`` (timm's) for the view's
    grid: the frequencies of the official ``get_2d_sincos_pos_embed``, its four quarters in
    another order.

    Blocks as the official ``models_mae.py``'s: timm's ``Block`` with MLP ratio 4, biases on
    query, key and value, and layer norms of eps 1e-6 (timm's ``LayerNorm``). Initialised as
    there too: Xavier-uniform linear weights, zero biases, the mask token from a normal of std
    0.02.
    """

    def __init__(self, in_dim: int, pixels: int, settings: MAESettings) -> None:
        # timm (and torchvision under it) loads when MAE is built, not when plugins are listed
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import Block

        super().__init__()
        dim = settings.decoder_embed_dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(
            *(
                Block(dim, settings.decoder_num_heads, qkv_bias=True)
                for _ in range(settings.decoder_depth)
            )
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, pixels)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, prefix: Tensor, visible: Tensor, keep: Tensor, grid: tuple[int, int]
    ) -> Tensor:
        """The pixels ``(B, N, pixels)`` of every patch of a ``grid``, from the encoder's prefix
        tokens ``(B, P, D)`` and its tokens ``(B, K, D)`` of the patches ``keep`` ``(B, K)``."""
        x = self.embed(torch.cat([prefix, visible], dim=1))
        n_prefix, width = prefix.shape[1], x.shape[-1]
        rows, cols = grid
        tokens = self.mask_token.to(x.dtype).expand(x.shape[0], rows * cols, width)
        index = keep.unsqueeze(-1).expand(-1, -1, width)
        tokens = tokens.scatter(1, index, x[:, n_prefix:])
        position = sslplug.sincos_position_embedding(rows, cols, width, x.device)
        x = torch.cat([x[:, :n_prefix], tokens + position.to(x.dtype)], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, n_prefix:])


class MAEEncoder(Encoder):
    """The ViT backbone on the visible patches only, and ``MAEDecoder``.

    ``forward`` gives ``Outputs.predictions[0]``: ``(B, N, patch_size**2 * C)``, the decoder's
    pixels for every patch of ``Views.images[0]`` (``pixel_predictions``).
    """

    requires = frozenset({"patch_mask"})
    provides = frozenset({PIXEL_PREDICTIONS})

    def __init__(
        self, backbone: nn.Module, feature_dim: int, settings: MAESettings, channels: int = 3
    ) -> None:
        vit = sslplug.token_backbone(backbone, "MAE's encoder")
        super().__init__(backbone, feature_dim)
        self.decoder = MAEDecoder(vit.embed_dim, vit.patch_size**2 * channels, settings)
        self.weight_decay = settings.weight_decay

    def forward(self, views: Views) -> Outputs:
        vit = sslplug.token_backbone(self.backbone, "MAE's encoder")
        images, keep = views.images[0], views.targets["keep"]
        prefix, visible = vit.tokens(images, keep)
        grid = vit.grid(images.shape[-2], images.shape[-1])
        pixels = self.decoder(prefix, visible, keep, grid)
        return Outputs(predictions=(pixels,))

    def optim_rules(self) -> sslplug.OptimRules:
        """The paper's weight decay (0.05) on the encoder's and decoder's weights; biases and
        norms get none, as the core's groups and the official code's ``add_weight_decay``."""
        group = sslplug.ParamGroup(self, name="mae", weight_decay=self.weight_decay)
        return sslplug.OptimRules(groups=(group,))


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` images as ``(B, N, patch_size**2 * C)`` patches, row-major over the
    grid, each patch's pixels in (row, column, channel) order, as the official ``patchify``.

    A side that is not a whole number of patches is padded with zeros at the bottom and right,
    as the backbone pads (timm's ``dynamic_img_pad``), so patch ``k`` is the one the encoder
    saw at ``k``.
    """
    p = patch_size
    b, c, h, w = images.shape
    images = F.pad(images, (0, -w % p, 0, -h % p))
    rows, cols = images.shape[-2] // p, images.shape[-1] // p
    grid = images.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
    return grid.reshape(b, rows * cols, p * p * c)


def unpatchify(patches: Tensor, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """The inverse of ``patchify``: ``(B, N, p*p*C)`` to images ``(B, C, rows*p, cols*p)``, to
    look at the decoder's reconstructions."""
    rows, cols = grid
    b = patches.shape[0]
    p = isqrt(patches.shape[-1] // channels)
    images = patches.reshape(b, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(b, channels, rows * p, cols * p)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch minus the mean of its pixels, over ``sqrt(var + eps)`` (Section 3,
    "Reconstruction target"; the variance is the unbiased one, as the official
    ``forward_loss`` takes ``Tensor.var``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(prediction: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """The loss of Section 3: the mean, over images ``b`` and hidden patches ``k`` in ``masked``
    ``(B, M)``, of ``|| prediction[b, k] - target[b, k] ||^2 / D``, for patches ``(B, N, D)``."""
    index = masked.unsqueeze(-1).expand(-1, -1, prediction.shape[-1])
    error = torch.gather(prediction, 1, index) - torch.gather(target, 1, index)
    return error.square().mean()


class MAELoss(sslplug.Loss):
    """Mean squared error between the predicted and the true pixels of the hidden patches
    (Section 3, "Reconstruction target"); visible patches do not count.

    The targets are the patches of ``Views.images[0]`` (the normalised view the encoder saw),
    in ``patchify``'s order, each normalised over its own pixels when ``norm_pix_loss``. The
    patch size is read from the predictions' width (``patch_size**2 * C``).
    """

    requires = frozenset({"patch_mask", PIXEL_PREDICTIONS})

    def __init__(self, norm_pix_loss: bool) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> sslplug.LossResult:
        images, masked = views.images[0], views.targets["masked"]
        prediction = outputs.predictions[0].float()
        channels, width = images.shape[1], prediction.shape[-1]
        patch = isqrt(width // channels)
        if patch * patch * channels != width:
            raise ValueError(
                f"pixel predictions of width {width} are not the pixels of square patches of "
                f"{channels}-channel images (patch_size**2 * {channels})"
            )
        if masked.shape[1] == 0:
            raise ValueError(
                f"no patch of the {prediction.shape[1]} is hidden: the loss has nothing to "
                f"reconstruct; raise mae.mask_ratio"
            )
        pixels = patchify(images.float(), patch)
        if pixels.shape[1] != prediction.shape[1]:
            raise ValueError(
                f"the view has {pixels.shape[1]} patches of {patch} px, the predictions "
                f"{prediction.shape[1]}"
            )
        if self.norm_pix_loss:
            pixels = normalize_patches(pixels)
        return sslplug.LossResult(masked_mse(prediction, pixels, masked))


@sslplug.hookimpl
def sslplug_settings() -> type:
    return MAESettings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register(
        PIXEL_PREDICTIONS,
        "Outputs.predictions[0]: (B, N, patch_size**2 * C) pixels predicted for every patch of "
        "Views.images[0], row-major, each patch in (row, column, channel) order (MAE)",
    )


@sslplug.hookimpl
def sslplug_augmentation(settings: MAESettings, run: RunContext) -> sslplug.Augmentations:
    return sslplug.Augmentations([sslplug.crop_flip_recipe(run.image_size, settings.crop_scale)])


@sslplug.hookimpl
def sslplug_views(
    settings: MAESettings, run: RunContext, augmentations: sslplug.Augmentations
) -> sslplug.ViewGenerator:
    return MaskedViewGenerator(augmentations, settings.mask_ratio, run)


@sslplug.hookimpl
def sslplug_encoder(
    settings: MAESettings, run: RunContext, backbone: nn.Module, feature_dim: int
) -> Encoder:
    return MAEEncoder(backbone, feature_dim, settings, run.channels)


@sslplug.hookimpl
def sslplug_loss(settings: MAESettings) -> sslplug.Loss:
    return MAELoss(settings.norm_pix_loss)
