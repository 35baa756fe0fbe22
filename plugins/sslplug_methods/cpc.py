"""CPC: contrastive predictive coding on a grid of image patches.

van den Oord et al. 2018 (arXiv:1807.03748), Section 3.2, and Hénaff et al. 2020, CPC v2
(arXiv:1905.09272). The image becomes a grid of overlapping patches (8-pixel patches at stride 4
on a 32x32 image: 7x7 of them); the backbone encodes each patch into a vector ``z``; a masked
context network, in which each position sees only the rows above it, summarises them into ``c``;
for each of the next ``K`` rows a linear map ``W_k`` predicts the patch vector ``k`` rows below,
``z[r + k] ~ W_k c[r]``, and InfoNCE scores each prediction against its true patch vector with
every other patch vector of the batch as a negative.

Because ``c[r]`` sees rows ``r - 1`` and above, and patch rows overlap only their neighbours, the
first row predicted (``k = 1``, row ``r + 1``) shares no pixel with anything ``c[r]`` saw.
Patches are augmented one by one, as CPC v2 does: colour jitter and colour dropping (grayscale)
with parameters drawn per patch, after a light crop and flip of the whole image.

Evaluation encodes the patch grid of the whole image and averages the patch vectors.

Usage::

    sslplug run --plugin cpc --set cpc.prediction_steps=2
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug import Encoder, Outputs, RunContext, Views


@attrs.define
class CPCSettings:
    """CPC v2's patch recipe scaled to small images (Hénaff et al. 2020, Appendix A).

    ``patch_size = 0`` is a quarter of the image side and ``patch_stride = 0`` half a patch, so
    that every image gives a 7x7 grid (the paper: 64-pixel patches at stride 32 on 256 px).
    ``prediction_steps`` rows are predicted below each context row (the paper predicts up to 5
    on its 7x7 grid; 3 leaves more context rows on the same grid).

    ``num_negatives``: each prediction is scored against its true patch vector and this many
    patch vectors drawn at random from the whole batch (shared by all predictions of a step);
    0 uses every patch vector of the batch, as the paper does. With a batch of 256 and 49 patches
    an image, that is 12,544 candidates for each of about 21,500 predictions, several seconds a
    step on two CPU cores; 1024 keeps a step under a second with most of the difficulty.
    """

    patch_size: int = 0
    patch_stride: int = 0
    prediction_steps: int = 3
    context_layers: int = 3
    num_negatives: int = 1024
    crop_scale: tuple[float, float] = (0.6, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.25

    def geometry(self, image_size: int) -> tuple[int, int]:
        size = self.patch_size or max(2, image_size // 4)
        return size, self.patch_stride or max(1, size // 2)


def extract_patches(images: Tensor, size: int, stride: int) -> Tensor:
    """``(B, C, H, W)`` to ``(B, gh, gw, C, size, size)``: the grid of patches, row-major."""
    patches = images.unfold(2, size, stride).unfold(3, size, stride)  # B, C, gh, gw, s, s
    return patches.permute(0, 2, 3, 1, 4, 5)


class CPCViews(sslplug.ViewGenerator):
    """One view: every patch of the batch, ``(B * gh * gw, C, size, size)``, image-major and
    row-major within an image; ``targets["grid"]`` is ``tensor([gh, gw])``."""

    requires = frozenset({"image_then_patch_pipelines"})
    provides = frozenset({"patch_grid"})

    def __init__(
        self, image_augmentation: nn.Module, patch_augmentation: nn.Module, size: int, stride: int
    ) -> None:
        super().__init__()
        self.image_augmentation = image_augmentation
        self.patch_augmentation = patch_augmentation
        self.size, self.stride = size, stride

    def forward(self, batch: Tensor) -> Views:
        images = self.image_augmentation(sslplug.to_float(batch))
        grid = extract_patches(images, self.size, self.stride)
        b, gh, gw = grid.shape[:3]
        patches = self.patch_augmentation(grid.reshape(b * gh * gw, *grid.shape[3:]))
        return Views(
            images=(sslplug.normalize(patches),),
            targets={"grid": torch.tensor([gh, gw])},  # on the CPU: read without a device sync
        )


class RowCausalConv(nn.Module):
    """A convolution over the patch grid in which output row ``r`` sees input rows up to ``r``
    (``strict=False``) or up to ``r - 1`` (``strict=True``), never a lower one."""

    def __init__(self, channels: int, kernel: int = 3, strict: bool = False) -> None:
        super().__init__()
        self.kernel, self.strict = kernel, strict
        self.conv = nn.Conv2d(channels, channels, kernel_size=(kernel, kernel))

    def forward(self, x: Tensor) -> Tensor:
        pad = self.kernel // 2
        top = self.kernel if self.strict else self.kernel - 1
        out = self.conv(F.pad(x, (pad, pad, top, 0)))
        return out[:, :, : x.shape[2]]


class MaskedContext(nn.Module):
    """PixelCNN-style context: a strictly row-causal first layer, then causal residual layers."""

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        self.first = RowCausalConv(channels, strict=True)
        self.rest = nn.ModuleList(RowCausalConv(channels) for _ in range(layers - 1))

    def forward(self, z: Tensor) -> Tensor:
        c = self.first(z)
        for layer in self.rest:
            c = c + layer(F.relu(c))
        return c


class CPCEncoder(Encoder):
    """Patch backbone, masked context network and one linear predictor per step below."""

    provides = frozenset({"patch_predictions"})

    def __init__(
        self, backbone: nn.Module, feature_dim: int, settings: CPCSettings, size: int, stride: int
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.size, self.stride = size, stride
        self.context = MaskedContext(feature_dim, settings.context_layers)
        self.predictors = nn.ModuleList(
            nn.Linear(feature_dim, feature_dim, bias=False)
            for _ in range(settings.prediction_steps)
        )

    def encode_grid(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch vectors as a map ``(B, D, gh, gw)``."""
        z = self.backbone(patches)
        gh, gw = grid
        return z.view(-1, gh, gw, z.shape[1]).permute(0, 3, 1, 2)

    def forward(self, views: Views) -> Outputs:
        gh, gw = (int(v) for v in views.targets["grid"])
        z = self.encode_grid(views.images[0], (gh, gw))
        c = self.context(z).permute(0, 2, 3, 1)  # B, gh, gw, D
        predictions = torch.stack([p(c) for p in self.predictors])  # K, B, gh, gw, D
        return Outputs(
            features=(z.mean(dim=(2, 3)),),
            predictions=(predictions,),
            extras={"patches": z.permute(0, 2, 3, 1)},
        )

    def features(self, images: Tensor) -> Tensor:
        grid = extract_patches(images, self.size, self.stride)
        b, gh, gw = grid.shape[:3]
        z = self.encode_grid(grid.reshape(b * gh * gw, *grid.shape[3:]), (gh, gw))
        return z.mean(dim=(2, 3))


def patch_info_nce(predictions: Tensor, patches: Tensor, num_negatives: int = 0) -> Tensor:
    """InfoNCE of CPC over a patch grid: each prediction against the patch vectors of the batch::

        L = mean over k of  -mean over (b, r) of  log( exp(p . z+) / sum_{z in Z} exp(p . z) )

    with ``p = W_k c[r]`` a prediction, ``z+`` its true patch vector and ``Z`` the candidates.
    ``predictions[k - 1, b, r]`` predicts ``patches[b, r + k]`` (``k`` = 1..K) for context rows
    ``r`` = 1 .. gh - 1 - k (row 0's context has seen nothing). With ``num_negatives = 0`` every
    patch vector of the batch is a candidate and the true one must score highest; otherwise the
    candidates are the true one and ``num_negatives`` patch vectors drawn from the batch (a draw
    of the true one itself is masked out).
    """
    steps, b, gh, gw, d = predictions.shape
    bank = patches.reshape(-1, d)  # B * gh * gw
    index = torch.arange(b * gh * gw, device=patches.device).view(b, gh, gw)
    losses = []
    for k in range(1, steps + 1):
        if gh - 1 - k < 1:
            continue
        queries = predictions[k - 1, :, 1 : gh - k].reshape(-1, d)
        positives = index[:, 1 + k : gh].reshape(-1)
        if num_negatives and num_negatives < len(bank):
            drawn = torch.randint(0, len(bank), (num_negatives,), device=bank.device)
            true = (queries * bank[positives]).sum(1, keepdim=True)
            others = (queries @ bank[drawn].T).masked_fill(
                drawn[None, :] == positives[:, None], float("-inf")
            )  # a draw of the true patch is not a negative
            logits = torch.cat([true, others], dim=1)
            labels = torch.zeros(len(queries), dtype=torch.long, device=bank.device)
        else:
            logits, labels = queries @ bank.T, positives
        losses.append(F.cross_entropy(logits, labels))
    return torch.stack(losses).mean()


class PatchInfoNCELoss(sslplug.Loss):
    """CPC's InfoNCE, averaged over the prediction steps."""

    requires = frozenset({"patch_grid", "patch_predictions"})

    def __init__(self, num_negatives: int = 0) -> None:
        super().__init__()
        self.num_negatives = num_negatives

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> sslplug.LossResult:
        with torch.autocast(outputs.predictions[0].device.type, enabled=False):
            loss = patch_info_nce(
                outputs.predictions[0].float(),
                outputs.extras["patches"].float(),
                self.num_negatives,
            )
        return sslplug.LossResult(loss, {})


@sslplug.hookimpl
def sslplug_settings() -> type:
    return CPCSettings


@sslplug.hookimpl
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    register(
        "image_then_patch_pipelines",
        "two unnormalised pipelines: one for the whole image, then one for every patch",
    )


@sslplug.hookimpl
def sslplug_augmentation(settings: CPCSettings, run: RunContext) -> sslplug.Augmentations:
    size = run.image_size
    image = nn.Sequential(
        K.RandomResizedCrop((size, size), scale=settings.crop_scale, cropping_mode="resample"),
        K.RandomHorizontalFlip(p=0.5),
    )
    patch = nn.Sequential(
        sslplug.ColorJitter(*settings.jitter, p=settings.jitter_prob),
        K.RandomGrayscale(p=settings.grayscale_prob),
    )
    return sslplug.Augmentations((image, patch), provides={"image_then_patch_pipelines"})


@sslplug.hookimpl
def sslplug_views(
    settings: CPCSettings, run: RunContext, augmentations: tuple[nn.Module, ...]
) -> sslplug.ViewGenerator:
    if len(augmentations) != 2:
        raise sslplug.ComponentMismatchError(
            f"CPC's views need two augmentation modules (whole image, then each patch), got "
            f"{len(augmentations)}"
        )
    return CPCViews(augmentations[0], augmentations[1], *settings.geometry(run.image_size))


@sslplug.hookimpl
def sslplug_encoder(
    settings: CPCSettings, run: RunContext, backbone: nn.Module, feature_dim: int
) -> Encoder:
    return CPCEncoder(backbone, feature_dim, settings, *settings.geometry(run.image_size))


@sslplug.hookimpl
def sslplug_loss(settings: CPCSettings) -> nn.Module:
    return PatchInfoNCELoss(settings.num_negatives)
