"""Weights to start from: the published weights of a backbone, or those of a file.

``model.pretrained = true`` asks torchvision or timm for the weights it publishes for the
model, through that library's own download and cache (``fetch_published``, called while the backbone
is built). ``model.pretrained = PATH`` reads a file into a built backbone (``load_weights``):

- a state dict, or a checkpoint holding one under ``state_dict``, ``model`` or ``module`` (timm's
  and most training scripts'), saved with ``torch.save`` or as ``.safetensors``;
- the backbone ``sslplug export`` wrote (its JSON note beside it);
- an sslplug run folder, or its ``last.pt``: the backbone of the run's encoder.

The keys of a file may carry a prefix (``module.``, ``backbone.``, ``encoder.backbone.``);
classifier weights (``fc.``, ``head.``) that the backbone has no place for are left out, as
the backbone is built without a classifier. Everything else must match: a missing or
unexpected key, or a tensor of another shape, is a ``CheckpointError`` naming them. A Vision
Transformer's position embedding (and patch embedding) of another grid is resampled to the
backbone's, as timm does when it loads weights for another image size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from sslplug.errors import CheckpointError, ConfigError

__all__ = [
    "PretrainedBackbone",
    "fetch_published",
    "load_weights",
    "pretrained_backbone",
    "read_weights",
    "timm_cache",
    "torchvision_cache",
]

log = logging.getLogger(__name__)

_NESTED = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "encoder.backbone.", "backbone.", "encoder.", "model.")
_CLASSIFIERS = ("fc.", "head.", "classifier.", "head_dist.")


def fetch_published(name: str, build: Any, cache: str) -> Any:
    """``build()``, which makes the model ``name`` with its published weights; an offline
    machine (or weights that do not exist) gives one ``ConfigError`` naming the model and
    ``cache``, where the library would have kept the file."""
    try:
        return build()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"model.pretrained=true: the published weights of {name!r} could not be fetched "
            f"({reason}). On a machine without internet, put them in the cache, {cache}, "
            f"or give model.pretrained=PATH (a weights file, an export or a run folder)"
        ) from None


def torchvision_cache(url: str) -> str:
    """Where ``torch.hub`` keeps the file of ``url``."""
    return str(Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name)


def timm_cache(model: str) -> str:
    """Where the Hugging Face hub keeps timm's weights of ``model`` (or its cache folder)."""
    import timm

    try:
        from huggingface_hub import constants

        cfg = timm.models.get_pretrained_cfg(model)
        hub_id = cfg.hf_hub_id if cfg is not None else None
        root = Path(constants.HF_HUB_CACHE)
    except Exception:  # no hub, or no published weights: the message names the model alone
        return "the Hugging Face hub's cache (huggingface-cli scan-cache)"
    if not hub_id:
        return str(root)
    return str(root / f"models--{hub_id.split('@')[0].replace('/', '--')}")


def read_weights(source: str | Path) -> dict[str, Tensor]:
    """The tensors of the weights at ``source`` (see the module's docstring), keys as saved."""
    path = Path(source).expanduser()
    if path.is_dir():
        from sslplug.checkpoint import FILENAME

        if not (path / FILENAME).is_file():
            raise CheckpointError(
                f"model.pretrained={str(source)!r} is a folder without {FILENAME}; give a run "
                f"folder, a weights file (.pt, .pth, .safetensors) or an export"
            )
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"model.pretrained={str(source)!r}: no such file or folder; give a weights file "
            f"(.pt, .pth, .safetensors), an sslplug export, a run folder, or true for the "
            f"backbone's published weights"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"model.pretrained={str(source)!r} cannot be read as weights: {exc}".splitlines()[0]
        ) from None
    return _tensors(state, source)


def _tensors(state: Any, source: str | Path) -> dict[str, Tensor]:
    """The state dict inside what ``torch.load`` read: an sslplug checkpoint's encoder, a
    nested ``state_dict``, or the mapping itself."""
    encoder = state.get("encoder") if isinstance(state, Mapping) else None
    if isinstance(encoder, Mapping) and "settings" in state:  # an sslplug checkpoint
        state = encoder
    for key in _NESTED:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"model.pretrained={str(source)!r} holds no state dict (a mapping of names to "
            f"tensors, or one under 'state_dict' or 'model')"
        )
    return dict(state)


def _targets(backbone: nn.Module) -> list[nn.Module]:
    """The modules a file's keys may name: the backbone, and a timm backbone's own model (what
    an export holds)."""
    targets = [backbone]
    for attribute in ("vit", "net"):
        inner = getattr(backbone, attribute, None)
        if isinstance(inner, nn.Module) and hasattr(backbone, "timm_name"):
            targets.insert(0, inner)
    return targets


def _match_keys(state: dict[str, Tensor], wanted: set[str]) -> dict[str, Tensor]:
    """``state`` with the prefix stripped that makes most of its keys names of ``wanted``, and
    without classifier weights ``wanted`` has no place for."""
    best = state
    best_hits = len(wanted & state.keys())
    for prefix in _PREFIXES:
        stripped = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        hits = len(wanted & stripped.keys())
        if hits > best_hits:
            best, best_hits = stripped, hits
    return {
        k: v
        for k, v in best.items()
        if k in wanted or not any(k.startswith(c) for c in _CLASSIFIERS)
    }


def _resample_vit(vit: nn.Module, state: dict[str, Tensor]) -> None:
    """Resample ``state``'s position and patch embeddings to ``vit``'s grid and patch, where
    they differ (timm's own resampling: bicubic, class and register tokens kept)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    own = vit.state_dict()
    weight = state.get("patch_embed.proj.weight")
    if weight is not None and weight.shape != own["patch_embed.proj.weight"].shape:
        size = own["patch_embed.proj.weight"].shape[-2:]
        state["patch_embed.proj.weight"] = resample_patch_embed(weight, list(size))
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        timm_vit: Any = vit
        prefix = 0 if getattr(timm_vit, "no_embed_class", False) else timm_vit.num_prefix_tokens
        grid = list(timm_vit.patch_embed.grid_size)
        old = pos.shape[1] - prefix
        side = math.isqrt(old)
        if side * side != old:
            return  # not a square grid: left for the strict load to name
        state["pos_embed"] = resample_abs_pos_embed(
            pos, grid, old_size=[side, side], num_prefix_tokens=prefix
        )


def load_weights(backbone: nn.Module, source: str | Path) -> None:
    """Load the weights at ``source`` into ``backbone``, strictly (see the module's
    docstring); raises ``CheckpointError`` naming what does not match."""
    state = read_weights(source)
    matches = [(t, _match_keys(state, set(t.state_dict()))) for t in _targets(backbone)]
    target, state = max(matches, key=lambda m: len(set(m[0].state_dict()) & m[1].keys()))
    own = target.state_dict()
    if "mask_token" in state and "mask_token" not in own:
        # a masked method's training machinery (iBOT, DINOv2), not a feature of the backbone
        del state["mask_token"]
    if hasattr(target, "patch_embed"):
        _resample_vit(target, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} (the backbone's: {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch(source, missing, unexpected, shapes))
    target.load_state_dict(state, strict=True)
    log.info("model.pretrained: %d tensors loaded from %s", len(state), source)


def _mismatch(
    source: str | Path, missing: list[str], unexpected: list[str], shapes: list[str]
) -> str:
    def some(keys: list[str]) -> str:
        shown = ", ".join(keys[:6])
        return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 6 else shown

    parts = []
    if missing:
        parts.append(f"missing keys: {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {some(unexpected)}")
    if shapes:
        parts.append(f"other shapes: {some(shapes)}")
    return (
        f"model.pretrained={str(source)!r} does not fit the backbone ({'; '.join(parts)}); "
        f"give weights of the same architecture (model.backbone, and model.cifar_stem for a "
        f"ResNet: 'on' or 'off' as the weights were trained)"
    )


@attrs.frozen
class PretrainedBackbone:
    """A backbone with weights: the module (eval mode), the width of its features, the image
    side it was trained on, and where its weights came from."""

    module: nn.Module
    feature_dim: int
    image_size: int
    source: str


RANDOM_PREFIX = "random:"


def pretrained_backbone(source: str, image_size: int = 0, backbone: str = "") -> PretrainedBackbone:
    """The backbone ``source`` names, with its weights, built for images of ``image_size`` (0:
    the side it was trained on).

    ``source`` is ``timm:NAME`` or a torchvision or preset backbone name (the weights the library
    publishes), ``random:BACKBONE`` (that backbone randomly initialised: a baseline), an sslplug
    run folder or ``last.pt``, a file ``sslplug export`` wrote (its note says the architecture),
    or any other weights file, whose architecture ``backbone`` names.
    """
    from sslplug.nn import BACKBONES, build_backbone
    from sslplug.vit import TIMM_PREFIX, VIT_PRESETS

    if source.startswith(RANDOM_PREFIX):
        name = source.removeprefix(RANDOM_PREFIX)
        net, width = build_backbone(name, image_size or 224)
        return PretrainedBackbone(net.eval(), width, image_size or 224, source)
    if source.startswith(TIMM_PREFIX) or source in BACKBONES or source in VIT_PRESETS:
        size = image_size or _published_size(source)
        net, width = build_backbone(source, size, published=True)
        return PretrainedBackbone(net.eval(), width, size, source)
    if not Path(source).expanduser().exists():
        resnets = ", ".join(b for b in sorted(BACKBONES) if b.startswith("resnet"))
        raise ConfigError(
            f"the weights {source!r} are neither published nor a file or folder; give "
            f"timm:NAME, a torchvision ResNet ({resnets}), "
            f"{RANDOM_PREFIX}BACKBONE, a run folder, an export or a weights file"
        )
    name, stem, size, patch, registers = _architecture(Path(source).expanduser(), backbone)
    size = image_size or size
    if not size:
        raise ConfigError(
            f"the weights {source!r} do not say the image size they were trained on; give it"
        )
    net, width = build_backbone(name, size, stem, patch_size=patch, registers=registers)
    load_weights(net, source)
    return PretrainedBackbone(net.eval(), width, size, source)


def _published_size(name: str) -> int:
    """The image side a published model was trained on: timm's configuration, else 224."""
    from sslplug.vit import TIMM_PREFIX

    if not name.startswith(TIMM_PREFIX):
        return 224
    import timm

    cfg = timm.models.get_pretrained_cfg(name.removeprefix(TIMM_PREFIX))
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def _architecture(path: Path, backbone: str) -> tuple[str, str, int, int, int]:
    """The backbone, CIFAR stem, image size, patch size and register tokens of the weights at
    ``path``: from a run's saved settings, an export's note, or ``backbone`` for any other
    file."""
    from sslplug.checkpoint import FILENAME
    from sslplug.nn import stem_choice

    checkpoint = path / FILENAME if path.is_dir() else path
    note = path.with_suffix(".json")
    if path.suffix != ".json" and note.is_file() and not path.is_dir():
        import json

        data = json.loads(note.read_text())
        if data.get("format") == "sslplug-backbone":
            args = data.get("timm_args", {})
            patch, registers = int(args.get("patch_size", 0)), int(args.get("reg_tokens", 0))
            stem = "on" if data.get("cifar_stem") else "off"
            size = int(data.get("image_size", 0))
            return backbone or data["backbone"], stem, size, patch, registers
    if checkpoint.is_file() and checkpoint.suffix in (".pt", ".pth") and not backbone:
        from sslplug.checkpoint import load_checkpoint

        try:
            state = load_checkpoint(checkpoint)
        except Exception:
            state = {}
        model = state.get("settings", {}).get("model") if isinstance(state, dict) else None
        if isinstance(model, dict):
            stem = stem_choice(str(model.get("cifar_stem", "auto")), model.get("pretrained", False))
            return (
                str(model.get("backbone", "small")),
                stem,
                int(state.get("image_size") or 0),
                int(model.get("patch_size", 0)),
                int(model.get("registers", 0)),
            )
    if not backbone:
        raise ConfigError(
            f"the weights {str(path)!r} do not say their architecture (no run settings, no "
            f"export note beside them); name it: the backbone setting beside the path "
            f"(model.backbone for model.pretrained, distill.teacher_backbone for a teacher)"
        )
    return backbone, "auto", 0, 0, 0
