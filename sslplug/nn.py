"""Backbones and heads shared by methods.

``build_backbone`` gives a network mapping ``(B, 3, H, W)`` to pooled features ``(B, D)``:
torchvision's ResNet-18/34/50 (with the CIFAR stem for small images: a 3x3 stride-1 first
convolution and no max-pool, as in SimCLR's CIFAR experiments, Chen et al. 2020, Appendix B.9)
or ``small``, a six-layer convolutional network that makes CPU runs practical.

``MLP`` is the projector and predictor of SimCLR, BYOL and Barlow Twins and, with its options,
the head of DINO. ``loss_predictor`` and ``loss_predictions`` are how a loss that reads
predictions brings its own predictor after an encoder without one (BYOL, MoCo v3, NNCLR).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sslplug.errors import ComponentMismatchError, ConfigError

if TYPE_CHECKING:  # components imports this module
    from sslplug.components import Encoder, Outputs

__all__ = [
    "ACTIVATIONS",
    "BACKBONES",
    "MLP",
    "SmallConvNet",
    "backbone_layers",
    "build_backbone",
    "cosine_tau",
    "ema_update",
    "loss_predictions",
    "loss_predictor",
    "projection_dim_for",
    "stem_choice",
    "uses_cifar_stem",
]

BACKBONES = ("small", "resnet18", "resnet34", "resnet50")
ACTIVATIONS = ("relu", "gelu")


class MLP(nn.Sequential):
    """Linear layers with batch norm and ReLU between them; none after the last by default.

    ``MLP(512, [4096], 256)`` is BYOL's projector: Linear-BN-ReLU-Linear (Grill et al. 2020,
    Section 3.3). ``last_batch_norm`` adds an affine-free BN after the last layer, as Barlow
    Twins' and SimSiam's projectors do.

    The keyword options serve the heads of later methods:

    - ``activation``: ``"relu"`` or ``"gelu"``, between hidden layers (GELU in DINO's head,
      Caron et al. 2021, and in MoCo v3's ViT heads, Chen et al. 2021).
    - ``batch_norm=False``: no BatchNorm1d in the hidden layers, whose Linear layers then have
      biases (DINO's head).
    - ``weight_norm_last``: the last Linear has no bias and is weight-normalised (Salimans &
      Kingma 2016) with its magnitude set to 1, so each output is a cosine-like score of unit
      weight rows; with ``norm_last_layer`` (the default, DINO's ``norm_last_layer``) that
      magnitude is frozen. DINO's head L2-normalises the input of this layer; compose two MLPs
      for that: ``MLP(d, [2048, 2048], 256, activation="gelu", batch_norm=False)``, then
      ``F.normalize``, then ``MLP(256, [], 65536, weight_norm_last=True)``.

    With the defaults the layers and ``state_dict`` keys are those of earlier versions, so their
    checkpoints load.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        last_batch_norm: bool = False,
        *,
        activation: str = "relu",
        batch_norm: bool = True,
        weight_norm_last: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown MLP activation {activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden_dims]
        for d_in, d_out in itertools.pairwise(dims):
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else nn.GELU())
        last = nn.Linear(dims[-1], out_dim, bias=not (last_batch_norm or weight_norm_last))
        if weight_norm_last:
            last = nn.utils.parametrizations.weight_norm(last)
            magnitude = last.parametrizations.weight.original0
            with torch.no_grad():
                magnitude.fill_(1.0)
            magnitude.requires_grad_(not norm_last_layer)
        layers.append(last)
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.out_dim = out_dim

    @property
    def last_layer(self) -> nn.Linear:
        """The final Linear layer (weight-normalised with ``weight_norm_last``)."""
        return next(m for m in reversed(self) if isinstance(m, nn.Linear))


def _conv_bn(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallConvNet(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (widths w, 2w, 4w, 8w; stride 2 from the second on) and
    global average pooling: about 98k parameters and 128 features at ``width=16``.

    Small enough to pre-train for a few minutes on two CPU cores, deep enough that pre-training
    beats a random initialisation by a wide margin.
    """

    def __init__(self, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        plan = [(in_channels, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 8 * w, 2)]
        self.features = nn.Sequential(
            *[m for c_in, c_out, s in plan for m in _conv_bn(c_in, c_out, s)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 8 * w

    def forward(self, images: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)


def uses_cifar_stem(cifar_stem: str, image_size: int) -> bool:
    """``auto`` picks the CIFAR stem for images of 64 px or less."""
    if cifar_stem == "auto":
        return image_size <= 64
    return cifar_stem == "on"


def stem_choice(cifar_stem: str, pretrained: bool | str) -> str:
    """``model.cifar_stem`` as a run applies it: ``auto`` is ``off`` with the published weights
    (``model.pretrained = true``), whose first convolution is ImageNet's 7x7."""
    return "off" if pretrained is True and cifar_stem == "auto" else cifar_stem


def build_backbone(
    name: str,
    image_size: int,
    cifar_stem: str = "auto",
    *,
    patch_size: int = 0,
    drop_path_rate: float = 0.0,
    pool: str = "auto",
    published: bool = False,
    registers: int = 0,
) -> tuple[nn.Module, int]:
    """The backbone ``name`` and the width of its pooled output, randomly initialised, or with
    the weights its library publishes (``published``; see ``sslplug.weights.fetch_published``).

    ``name`` is ``small``, a torchvision ResNet, a ViT preset or ``timm:NAME``
    (``sslplug.vit.build_timm_backbone``, which takes the keyword arguments). The published
    weights have the ImageNet stem, so ``cifar_stem = "auto"`` keeps it with them.
    """
    from sslplug.vit import TIMM_PREFIX, VIT_PRESETS, build_timm_backbone

    if name in VIT_PRESETS or name.startswith(TIMM_PREFIX):
        return build_timm_backbone(
            name, image_size, patch_size, drop_path_rate, pool, published, registers
        )
    if registers:
        raise ConfigError(
            f"model.registers={registers}: register tokens belong to Vision Transformers, and "
            f"the backbone {name!r} is not one; choose a ViT preset or timm:NAME, or leave it 0"
        )
    if name == "small":
        if published:
            raise ConfigError(
                "model.pretrained=true: the small backbone has no published weights; give "
                "model.pretrained=PATH (a run folder or export of one) or another model.backbone"
            )
        net = SmallConvNet()
        return net, net.out_dim
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    import torchvision.models  # loaded when a ResNet is built: it takes seconds

    if published:
        from sslplug.weights import fetch_published, torchvision_cache

        weights = torchvision.models.get_model_weights(name).DEFAULT
        net = fetch_published(
            f"{name} ({weights})",
            lambda: getattr(torchvision.models, name)(weights=weights),
            torchvision_cache(weights.url),
        )
        cifar_stem = "off" if cifar_stem == "auto" else cifar_stem
    else:
        net = getattr(torchvision.models, name)(weights=None)
    if uses_cifar_stem(cifar_stem, image_size):
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def backbone_layers(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in layers, from the input on, for layer-wise decay.

    ViT (``sslplug.ViTBackbone``): the patch and position embeddings and class token, then one
    layer per block; its final norm counts with the head, as in MAE's fine-tuning code. ResNet:
    the stem (first convolution and its norm), then each of the four stages. The small
    backbone: each convolution with its norm. Any other backbone: one layer of all its
    parameters (no decay inside it).
    """
    from sslplug.vit import ViTBackbone

    if isinstance(backbone, ViTBackbone):
        vit: Any = backbone.vit
        blocks = [list(block.parameters()) for block in vit.blocks]
        in_blocks = {id(p) for layer in blocks for p in layer}
        after = {id(p) for name in ("norm", "fc_norm", "head") for p in _params(vit, name)}
        embeddings = [p for p in vit.parameters() if id(p) not in in_blocks and id(p) not in after]
        return [embeddings, *blocks]
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        stem = [*_params(backbone, "conv1"), *_params(backbone, "bn1")]
        return [stem, *(list(getattr(backbone, f"layer{i}").parameters()) for i in range(1, 5))]
    if isinstance(backbone, SmallConvNet):
        convs = [m for m in backbone.features if isinstance(m, nn.Conv2d)]
        norms = [m for m in backbone.features if isinstance(m, nn.BatchNorm2d)]
        return [[*c.parameters(), *n.parameters()] for c, n in zip(convs, norms)]
    return [list(backbone.parameters())]


def _params(module: nn.Module, name: str) -> list[nn.Parameter]:
    child = getattr(module, name, None)
    return list(child.parameters()) if isinstance(child, nn.Module) else []


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` for parameters; buffers (batch-norm
    statistics) are copied. ``target`` and ``online`` must have the same structure."""
    target_params: list[torch.Tensor] = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(target_params, online_params, 1.0 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def cosine_tau(tau_base: float, step: int, total_steps: int) -> float:
    """BYOL's EMA rate: ``1 - (1 - tau_base) * (cos(pi * step / total_steps) + 1) / 2``, rising
    from ``tau_base`` at the first step to 1 at the last (Grill et al. 2020, Section 3.2)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def scheduled_momentum(momentum_base: float, schedule: str, step: int, total_steps: int) -> float:
    """The EMA rate of a target network after optimizer step ``step`` of ``total_steps``:
    ``cosine_tau`` (``schedule="cosine"``, BYOL) or ``momentum_base`` throughout
    (``"constant"``, MoCo v2); another schedule is a ``ValueError`` naming it."""
    if schedule == "constant":
        return momentum_base
    if schedule == "cosine":
        return cosine_tau(momentum_base, step, total_steps)
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")


def projection_dim_for(encoder: Encoder, loss: str) -> int:
    """``encoder.projection_dim``, which the ``loss`` loss (``"BYOL"``) needs; refused with a
    ``ComponentMismatchError`` that says what the encoder provides instead when it is 0."""
    if not encoder.projection_dim:
        raise ComponentMismatchError(
            f"the {loss} loss needs projections: the encoder {type(encoder).__name__} provides "
            f"{sorted(encoder.provides) or 'nothing'} and no projection_dim"
        )
    return encoder.projection_dim


def loss_predictor(
    encoder: Encoder, loss: str, build: Callable[[int], nn.Module]
) -> nn.Module | None:
    """The predictor that a loss reading predictions brings after an encoder without one.

    ``None`` when the encoder provides ``prediction``; otherwise ``build(projection_dim)``
    (``projection_dim_for`` refuses an encoder without projections). The loss keeps it as its
    ``predictor`` submodule, so that it trains with the encoder and is checkpointed with the
    loss; such a loss requires ``projection`` instead of ``prediction`` and reads its inputs
    with ``loss_predictions``. BYOL's, MoCo v3's and NNCLR's losses follow SimCLR's or Barlow
    Twins' encoder this way (``--plugin barlow_twins --loss byol``).
    """
    if "prediction" in encoder.provides:
        return None
    return build(projection_dim_for(encoder, loss))


def loss_predictions(
    outputs: Outputs, predictor: nn.Module | None, count: int = 2
) -> tuple[Tensor, ...]:
    """The predictions of the first ``count`` views: the encoder's, or, from a loss that brought
    its own ``predictor`` (``loss_predictor``), that predictor on their projections in one
    batched call, as ``PredictorEncoder`` makes them."""
    if predictor is None:
        return tuple(outputs.predictions[:count])
    projections = outputs.projections[:count]
    return predictor(torch.cat(projections)).split([z.shape[0] for z in projections])
