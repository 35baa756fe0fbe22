"""One assembly path: how a run's parts are built, in order, for every command.

``assemble`` builds the backbone, the five components (through the plugins), places them on
the device (wrapping them for DDP on many ranks) and, for training, the optimiser with the rules
the components declared. ``sslplug run``, ``bench``, ``eval``, ``finetune`` and ``export`` all
build through it, so the order (and so the random initialisation a seed gives) is the same
everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from sslplug import distributed
from sslplug.config import RunConfig, RunContext
from sslplug.nn import build_backbone
from sslplug.optim import Optimization, cycles_of
from sslplug.plugins import Components, PluginRegistry
from sslplug.runtime import place, rng_state, set_rng_state, wrap_for_ddp

__all__ = ["Assembly", "assemble"]


@attrs.define
class Assembly:
    """A run's parts, built: its context, components, DDP wrappers and optimisation.

    ``init_rng`` is the random-number state the components were built from, so that a later
    command can rebuild the very same random initialisation.
    """

    context: RunContext
    parts: Components
    init_rng: dict[str, Any]
    optimization: Optimization | None = None
    wrapped: dict[str, nn.Module] = attrs.Factory(dict)


def assemble(
    config: RunConfig,
    registry: PluginRegistry,
    *,
    image_size: int,
    device: torch.device,
    num_classes: int = 0,
    steps_per_epoch: int = 1,
    total_steps: int = 1,
    out_dir: Path = Path("."),
    data: Any = None,
    init_rng: dict[str, Any] | None = None,
    train: bool = True,
) -> Assembly:
    """Build a run's parts in the one order every command uses.

    Args:
        init_rng: the random-number state to build from (a saved run's, to rebuild its
            initialisation); the current state when ``None``.
        train: also build the optimisation (and DDP wrappers on many ranks); ``False`` for
            commands that only read the encoder.
    """
    context = RunContext(
        config=config,
        image_size=image_size,
        channels=3,
        num_classes=num_classes,
        device=device,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        out_dir=out_dir,
        data=data,
    )
    if init_rng is not None:
        set_rng_state(init_rng)
    state = rng_state()
    parts = _build_parts(config, registry, context)
    place(parts, device, config.train.channels_last)
    assembly = Assembly(context, parts, state)
    if not train:
        return assembly
    if distributed.world_size() > 1:
        assembly.wrapped = wrap_for_ddp(parts, device, config.train.sync_batchnorm)
    assembly.optimization = Optimization(
        config.optim,
        [parts.encoder, parts.loss],
        steps_per_epoch,
        total_steps,
        rules=parts.optim_rules(),
        # none: one cycle over the run's total_steps
        cycles=cycles_of(config.train.cycles, config.train.epochs, steps_per_epoch)
        if config.train.cycles
        else None,
    )
    return assembly


def _build_parts(config: RunConfig, registry: PluginRegistry, context: RunContext) -> Components:
    """The backbone, then the components through the registry; the engine's context learns the
    backbone and the plugin of each component before they are built, and the parts after."""
    model = config.model
    backbone, feature_dim = build_backbone(
        model.backbone,
        context.image_size,
        model.cifar_stem,
        patch_size=model.patch_size,
        drop_path_rate=model.drop_path_rate,
        pool=model.pool,
    )
    context.backbone = backbone
    context.components = registry.resolve(config)
    parts = registry.build(config, context, backbone, feature_dim)
    context.components, context.parts = parts.sources, parts
    return parts
