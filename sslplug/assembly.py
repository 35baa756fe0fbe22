"""One assembly path: how a run's parts are built, in order, for every command.

``assemble`` builds the backbone, the five components (through the plugins), places them on
the device (on many ranks, wrapped for DDP or sharded, as ``train.strategy`` says) and, for
training, the optimiser with the rules the components declared. ``sslplug run``, ``bench``,
``eval``, ``finetune`` and ``export`` all build through it, so the order (and so the random
initialisation a seed gives) is the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from sslplug import distributed, fsdp
from sslplug.config import OptimSettings, RunConfig, RunContext
from sslplug.nn import backbone_layers, build_backbone, stem_choice
from sslplug.optim import Optimization, OptimRules, ParamGroup, cycles_of
from sslplug.plugins import Components, PluginRegistry
from sslplug.runtime import place, rng_state, set_rng_state, wrap_for_ddp
from sslplug.weights import load_weights

__all__ = ["Assembly", "assemble", "backbone_rules"]


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
    start_weights: bool = True,
) -> Assembly:
    """Build a run's parts in the one order every command uses.

    Args:
        init_rng: the random-number state to build from (a saved run's, to rebuild its
            initialisation); the current state when ``None``.
        train: also build the optimisation (and, on many ranks, DDP wrappers or the shards
            of ``sslplug.fsdp``); ``False`` for commands that only read the encoder.
        start_weights: load the weights of ``model.pretrained``; ``False`` where a checkpoint
            replaces them (a resume, a trained run's encoder), so that the file need not exist.
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
    parts = _build_parts(config, registry, context, start_weights)
    sharded = train and config.train.strategy == "fsdp" and distributed.world_size() > 1
    place(parts, device, config.train.channels_last and not sharded)  # FSDP: contiguous only
    assembly = Assembly(context, parts, state)
    if not train:
        return assembly
    assembly.wrapped = _over_ranks(config, parts, device)
    assembly.optimization = Optimization(
        config.optim,
        [parts.encoder, parts.loss],
        steps_per_epoch,
        total_steps,
        rules=[*parts.optim_rules(), *backbone_rules(config.optim, parts)],
        # none: one cycle over the run's total_steps
        cycles=cycles_of(config.train.cycles, config.train.epochs, steps_per_epoch)
        if config.train.cycles
        else None,
    )
    return assembly


def _over_ranks(config: RunConfig, parts: Components, device: torch.device) -> dict[str, nn.Module]:
    """On many ranks, the parts wrapped for DDP or sharded (``train.strategy``,
    ``sslplug.fsdp``); the wrappers the step goes through (none for sharded parts, which
    ``fully_shard`` changes in place)."""
    if distributed.world_size() == 1:
        return {}
    if config.train.strategy == "fsdp":
        fsdp.shard(parts, device)
        return {}
    return wrap_for_ddp(parts, device, config.train.sync_batchnorm)


def _build_parts(
    config: RunConfig, registry: PluginRegistry, context: RunContext, start_weights: bool = True
) -> Components:
    """The backbone (with the weights of ``model.pretrained``), then the components through the
    registry; the engine's context learns the backbone and the plugin of each component before
    they are built, and the parts after."""
    model = config.model
    backbone, feature_dim = build_backbone(
        model.backbone,
        context.image_size,
        stem_choice(model.cifar_stem, model.pretrained),
        patch_size=model.patch_size,
        drop_path_rate=model.drop_path_rate,
        registers=model.registers,
        pool=model.pool,
        published=model.pretrained is True and start_weights,
    )
    if start_weights and isinstance(model.pretrained, str):
        load_weights(backbone, model.pretrained)
    context.backbone = backbone
    context.components = registry.resolve(config)
    parts = registry.build(config, context, backbone, feature_dim)
    context.components, context.parts = parts.sources, parts
    return parts


def backbone_rules(settings: OptimSettings, parts: Components) -> list[OptimRules]:
    """The backbone's learning rates for continued pre-training: layer ``i`` of ``L``
    (``backbone_layers``) at ``backbone_lr_scale * layer_decay ** (L - i)`` times ``optim.lr``,
    its other parameters (a ViT's final norm) at ``backbone_lr_scale``; none when both are 1.
    Parameters a component's own rules claim keep those rules."""
    scale, decay = settings.backbone_lr_scale, settings.layer_decay
    if scale == 1.0 and decay == 1.0:
        return []
    backbone = parts.encoder.backbone
    claimed = {id(p) for rules in parts.optim_rules() for g in rules.groups for p in g.trainable()}
    layers = backbone_layers(backbone)
    in_layers = {id(p) for layer in layers for p in layer}
    rest = [p for p in backbone.parameters() if id(p) not in in_layers]
    groups = [
        ParamGroup(
            [p for p in params if id(p) not in claimed],
            name=f"backbone.{name}",
            lr_scale=scale * decay ** (len(layers) - i),
        )
        for i, (name, params) in enumerate(
            [*((str(i), layer) for i, layer in enumerate(layers)), ("rest", rest)]
        )
    ]
    return [OptimRules(groups=tuple(g for g in groups if g.trainable()))]
