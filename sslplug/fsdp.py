"""Sharded training over several ranks: ``train.strategy = "fsdp"``.

Under DDP (``train.strategy = "ddp"``, the default) every rank holds the whole model, its
gradients and the optimiser's state. With ``fsdp`` and several ranks, torch's FSDP2
(``torch.distributed.fsdp.fully_shard``) splits every weight of the encoder and of the target
network over the ranks along its first dimension (a ``DTensor``), gathers the weights of a
unit just before it runs and frees them after, and reduce-scatters the gradients, so that each
rank steps the optimiser on its own slice and keeps only that slice's state. A ViT's
transformer blocks are units of their own, or, without such blocks (the small ConvNet, a
ResNet), the backbone; the rest of the network is one more. A loss with weights of its own
(SwAV's prototypes) is refused (``shard``).

A checkpoint holds whole tensors whatever the strategy (``full_state``), so a run trained
sharded loads, resumes, exports and evaluates in one process, or under DDP, as it is; a resume
under fsdp cuts the whole tensors back into this rank's shards (``load_full_state``,
``shard_optimizer_state``). With the same seed, a run under fsdp computes DDP's losses and
weights (``tests/test_fsdp.py``; ``docs/distributed.md`` gives the measures).

torch's FSDP modules are imported when a run shards, not before: a sharded module (or
``DTensor``) cannot exist until they are, which ``is_sharded`` and ``full_state`` use to do
nothing at no cost in a run that does not shard.
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from sslplug import distributed
from sslplug.config import RunConfig
from sslplug.errors import ConfigError

if TYPE_CHECKING:
    from sslplug.plugins import Components

__all__ = [
    "ENCODER_READERS",
    "check_strategy",
    "full_state",
    "is_sharded",
    "load_full_state",
    "shard",
    "shard_optimizer_state",
]

# the core's lifecycle plugins that run the encoder on rank 0 alone (kNN, the health measures,
# and the baselines both take on the random initialisation)
ENCODER_READERS = ("knn", "health")


def check_strategy(config: RunConfig, world: int) -> list[str]:
    """Refuse, before any work, what ``train.strategy = "fsdp"`` cannot do over ``world``
    ranks; return the lines the run should print about its strategy.

    Refused with several ranks, each with the setting that avoids it:

    - the monitors that read the encoder on rank 0 alone (the kNN and health monitors, and
      TensorBoard's embeddings at the end): rank 0 holds only its shard of each weight, and
      gathering the rest is a collective that the other ranks, outside the lifecycle hooks,
      never join. ``sslplug eval RUN`` measures the checkpoint afterwards, in one process;
    - ``train.compile`` and ``train.sync_batchnorm``, not tried with fsdp.

    A loss with trainable weights is refused too, once the parts are built (``shard``).

    Channels-last weights are switched off (FSDP shards only contiguous weights), with a line
    that says so; with one process nothing is sharded and the run trains as under DDP.
    """
    train = config.train
    if train.strategy != "fsdp":
        return []
    if world == 1:
        return [
            "train.strategy=fsdp with one process: nothing to shard, the model trains whole "
            "(sharding needs several ranks: torchrun --nproc-per-node N)"
        ]
    problems = []
    readers = [name for name in ENCODER_READERS if name not in train.disable]
    if readers:
        flags = " ".join(f"--disable {name}" for name in readers)
        problems.append(f"{' and '.join(readers)} run the whole encoder on rank 0: {flags}")
    if "tensorboard" not in train.disable and _embedding_samples(config):
        problems.append(
            "tensorboard writes test features from the whole encoder on rank 0 at the end: "
            "--set tensorboard.embedding_samples=0"
        )
    if train.compile:
        problems.append("train.compile has not been tried with fsdp: --set train.compile=false")
    if train.sync_batchnorm:
        problems.append(
            "train.sync_batchnorm has not been tried with fsdp: --set train.sync_batchnorm=false"
        )
    if problems:
        lines = "\n".join(f"  {problem}" for problem in problems)
        raise ConfigError(
            f"train.strategy=fsdp over {world} ranks leaves each rank only a shard of the "
            f"model; this run has settings that need it whole, or that were not tried "
            f"sharded:\n{lines}\n"
            f"Change these, or train with --set train.strategy=ddp (docs/distributed.md)"
        )
    if train.channels_last:
        return [
            "train.strategy=fsdp: weights stay contiguous, train.channels_last is ignored "
            "(FSDP shards only contiguous weights)"
        ]
    return []


def _embedding_samples(config: RunConfig) -> int:
    """``tensorboard.embedding_samples`` of ``config`` (its default when the section was read
    without the monitor's settings class)."""
    from sslplug.monitors.tensorboard import TensorBoardSettings

    return config.settings_of("tensorboard", TensorBoardSettings).embedding_samples


def shard(parts: Components, device: torch.device) -> None:
    """Shard, in place, the encoder and the target network over the ranks of the process group.

    Every rank first takes rank 0's weights and buffers, as DDP does when it wraps a model:
    once sharded, each weight is held once, and the ranks can no longer be compared. The units
    that gather their weights together are each timm transformer block, or, in a network
    without such blocks (the small ConvNet, a ResNet), its backbone; then the rest of each
    network. The encoder needs such a unit inside it: FSDP starts a unit's backward from the
    tensors its forward returns, and it does not look inside the ``Outputs`` an encoder
    returns, so an encoder sharded as one unit would never reduce its gradients. The target
    network, which has no backward pass, gives its gathered weights back after each forward
    (``reshard_after_forward``); otherwise its top-level weights would stay whole, and its
    moving average would mix whole tensors with the encoder's shards. Build the optimiser
    after this: it must see the sharded parameters.

    A loss with trainable weights is refused: SwAV rescales its prototypes in place inside its
    forward, which a sharded module would apply to a gathered copy and lose.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(p.requires_grad for p in parts.loss.parameters()):
        raise ConfigError(
            f"train.strategy=fsdp shards the encoder and the target network, not a loss with "
            f"trainable weights ({type(parts.loss).__name__}: a sharded copy would lose what its "
            f"forward changes in place); use --set train.strategy=ddp"
        )
    if not _units(parts.encoder):
        raise ConfigError(
            f"train.strategy=fsdp shards an encoder by its transformer blocks or its backbone "
            f"module, and {type(parts.encoder).__name__} has neither; use "
            f"--set train.strategy=ddp"
        )
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    for network, after_forward in ((parts.encoder, None), (parts.target_update, True)):
        if network is None or next(network.parameters(), None) is None:
            continue
        _take_rank0_state(network)
        for unit in _units(network):
            fully_shard(unit, mesh=mesh)
        fully_shard(network, mesh=mesh, reshard_after_forward=after_forward)


def _units(network: nn.Module) -> list[nn.Module]:
    """The modules of ``network`` to shard as units of their own: its timm transformer
    blocks; without any, its ``backbone`` (none for a network that has no such module)."""
    from timm.models.vision_transformer import Block

    blocks: list[nn.Module] = [m for m in network.modules() if isinstance(m, Block)]
    backbone = getattr(network, "backbone", None)
    return blocks or ([backbone] if isinstance(backbone, nn.Module) else [])


def _take_rank0_state(network: nn.Module) -> None:
    """Overwrite this rank's weights and buffers with rank 0's."""
    with torch.no_grad():
        for tensor in itertools.chain(network.parameters(), network.buffers()):
            dist.broadcast(tensor.detach(), src=0)


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` was sharded by ``shard`` (``fully_shard``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def full_state(state: Any) -> Any:
    """``state`` (a module's or an optimiser's state dict, dicts and lists within) with every
    shard gathered into its whole tensor, on the CPU: what a checkpoint holds.

    Gathering is a collective: every rank calls this, on states of the same layout. Rank 0
    keeps the whole tensors; the other ranks, which write nothing, get ``None`` in their place
    and so never hold a whole copy. ``state`` itself is not changed (an optimiser's state dict
    shares its inner dicts with the live optimiser); without shards it is returned as it is.
    """
    tensors = sys.modules.get("torch.distributed.tensor")
    if tensors is None:
        return state
    return _gathered(state, tensors.DTensor, distributed.is_main())


def _gathered(state: Any, dtensor: type, keep: bool) -> Any:
    if isinstance(state, dtensor):
        whole = state.full_tensor()  # type: ignore[attr-defined]
        return whole.cpu() if keep else None
    if isinstance(state, dict):
        out = copy.copy(state)  # its type and attributes (a module state dict's _metadata)
        for key, value in state.items():
            out[key] = _gathered(value, dtensor, keep)
        return out
    if isinstance(state, list | tuple):
        return type(state)(_gathered(value, dtensor, keep) for value in state)
    return state


def load_full_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a checkpoint's whole tensors into ``module``; a sharded one keeps of each only this
    rank's shard (torch's ``set_model_state_dict``, which ``Module.load_state_dict`` cannot
    replace: it refuses to copy whole tensors into shards). Raises ``RuntimeError`` for keys or
    shapes that do not match, as ``Module.load_state_dict`` does."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a copy: set_model_state_dict replaces the values of the dict it is given
    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a checkpoint's whole tensors, keep of each state
    tensor of a sharded parameter (AdamW's moments, a momentum buffer) only this rank's shard,
    placed as the parameter is: ``load_state_dict`` keeps them whole, and the next step would
    mix whole tensors with shards. Scalars (AdamW's step count) stay as they are."""
    tensors = sys.modules.get("torch.distributed.tensor")
    if tensors is None:
        return
    for param, state in optimizer.state.items():
        if not isinstance(param, tensors.DTensor):
            continue
        for name, value in state.items():
            if type(value) is torch.Tensor and value.shape == param.shape:
                state[name] = tensors.distribute_tensor(
                    value.to(param.device),
                    param.device_mesh,
                    param.placements,
                    src_data_rank=None,  # every rank read the same checkpoint: no messages
                )
