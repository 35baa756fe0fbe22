"""sslplug: self-supervised pre-training of image encoders, every method a plugin.

The public API for plugin authors is what this module exports: the hook marker, the objects
that flow between components, and the shared building blocks (augmentation recipes and the
blur rule, heads, the predictor a loss brings, the EMA update). Built-in methods under
``plugins/`` import nothing else from the core.
"""

from __future__ import annotations

from sslplug.augment import (
    BYOLAugmentation,
    ColorJitter,
    MultiViewGenerator,
    Normalization,
    RandomResizedCrop,
    blur_on,
    byol_recipe,
    crop_flip_recipe,
    denormalize,
    multicrop_recipe,
    normalize,
    simclr_recipe,
    to_float,
)
from sslplug.components import (
    CAPABILITIES,
    Augmentations,
    Encoder,
    Loss,
    LossResult,
    MomentumTarget,
    Outputs,
    PredictorEncoder,
    PretextCrossEntropy,
    ProjectorEncoder,
    TargetUpdate,
    ViewGenerator,
    Views,
    run_by_resolution,
)
from sslplug.config import Progress, RunContext
from sslplug.distributed import all_reduce_sum, gather, rank, world_size
from sslplug.errors import (
    CheckpointError,
    ComponentMismatchError,
    ConfigError,
    DataError,
    PluginError,
    SslplugError,
)
from sslplug.hookspecs import hookimpl
from sslplug.masking import random_patch_mask, sample_block_masks, sample_blockwise_masks
from sslplug.nn import (
    MLP,
    cosine_tau,
    ema_update,
    loss_predictions,
    loss_predictor,
    projection_dim_for,
)
from sslplug.optim import OptimRules, ParamGroup
from sslplug.spreading import koleo_loss, sinkhorn_knopp
from sslplug.teacher import EMATeacher, FrozenTeacher
from sslplug.validate import non_negative, positive, scale_range, unit_interval
from sslplug.vit import ViTBackbone, sincos_position_embedding, token_backbone
from sslplug.weights import PretrainedBackbone, pretrained_backbone

__version__ = "0.1.0"

__all__ = [
    "CAPABILITIES",
    "MLP",
    "Augmentations",
    "BYOLAugmentation",
    "CheckpointError",
    "ColorJitter",
    "ComponentMismatchError",
    "ConfigError",
    "DataError",
    "EMATeacher",
    "Encoder",
    "FrozenTeacher",
    "Loss",
    "LossResult",
    "MomentumTarget",
    "MultiViewGenerator",
    "Normalization",
    "OptimRules",
    "Outputs",
    "ParamGroup",
    "PluginError",
    "PredictorEncoder",
    "PretextCrossEntropy",
    "PretrainedBackbone",
    "Progress",
    "ProjectorEncoder",
    "RandomResizedCrop",
    "RunContext",
    "SslplugError",
    "TargetUpdate",
    "ViTBackbone",
    "ViewGenerator",
    "Views",
    "__version__",
    "all_reduce_sum",
    "blur_on",
    "byol_recipe",
    "cosine_tau",
    "crop_flip_recipe",
    "denormalize",
    "ema_update",
    "gather",
    "hookimpl",
    "koleo_loss",
    "loss_predictions",
    "loss_predictor",
    "multicrop_recipe",
    "non_negative",
    "normalize",
    "positive",
    "pretrained_backbone",
    "projection_dim_for",
    "random_patch_mask",
    "rank",
    "run_by_resolution",
    "sample_block_masks",
    "sample_blockwise_masks",
    "scale_range",
    "simclr_recipe",
    "sincos_position_embedding",
    "sinkhorn_knopp",
    "to_float",
    "token_backbone",
    "unit_interval",
    "world_size",
]
