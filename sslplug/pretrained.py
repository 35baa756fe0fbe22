"""Pre-trained encoders after the run: rebuild one from a checkpoint, and export its backbone.

``load_run(path)`` reads a run folder (or a checkpoint file) and the settings it was trained
with. ``build_encoder`` rebuilds the encoder from those settings, through the same plugins and
in the same order as ``sslplug run`` does, and loads the trained weights into it, or leaves the
random initialisation of that run's seed in place (``pretrained=False``): the baseline that
evaluation and fine-tuning compare against. The run saved the random-number state it built its
components from, so the rebuilt initialisation is the very one it started from.

``export_backbone`` writes the backbone alone as a plain state dict. A ResNet's loads with
``strict=True`` into the torchvision model of the same name once its classifier is removed and,
for images of 64 px or less, the CIFAR stem is put in::

    net = torchvision.models.resnet18()
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load("backbone.pt", weights_only=True))

A timm backbone (a ViT preset or ``timm:NAME``) writes the timm model's own state dict, which
loads with ``strict=True`` into ``timm.create_model(NAME, num_classes=0, **ARGS)``, NAME and
ARGS (image and patch size, and a preset's width and depth) being in the note beside it.
"""  # noqa: E501

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from sslplug.assembly import assemble
from sslplug.checkpoint import FILENAME, load_checkpoint
from sslplug.components import Encoder
from sslplug.config import RunConfig, load_config
from sslplug.errors import CheckpointError, ConfigError, OutputError
from sslplug.nn import stem_choice, uses_cifar_stem
from sslplug.onnx_export import onnx_model, onnx_note
from sslplug.outputs import check_new_file, write_atomically
from sslplug.plugins import PluginRegistry
from sslplug.rundir import MARKERS
from sslplug.runtime import seed_everything

__all__ = ["EXPORT_FORMATS", "Run", "build_encoder", "build_views", "export_backbone", "load_run"]

# what ``export_backbone`` writes: the weights for torch, or an ONNX model for deployment
EXPORT_FORMATS = ("state_dict", "onnx")
# the input a state dict's note describes (an ONNX model's note says more: onnx_export.onnx_note)
_STATE_DICT_INPUT = "float images normalised with sslplug.Normalization (ImageNet mean and std)"


@attrs.define
class Run:
    """A finished (or interrupted) run: its folder, checkpoint and settings."""

    run_dir: Path
    checkpoint: Path
    state: dict[str, Any]
    config: RunConfig

    @property
    def components(self) -> dict[str, str]:
        return dict(self.state.get("components", {}))

    @property
    def epoch(self) -> int:
        return int(self.state.get("epoch", 0))


def load_run(path: str | Path, registry: PluginRegistry) -> Run:
    """The run whose folder (or checkpoint file) is ``path``.

    Raises ``CheckpointError`` for a missing, corrupt or foreign file, and ``ConfigError`` when
    its settings hold the section of a plugin that is not installed and supplied one of its
    components (the section of an uninstalled plugin that it did not use is left out).
    """
    path = Path(path)
    checkpoint = path / FILENAME if path.is_dir() else path
    state = load_checkpoint(checkpoint)
    settings = state.get("settings")
    if (
        not isinstance(settings, dict)
        or not all(isinstance(section, dict) for section in settings.values())
        or not isinstance(state.get("encoder"), dict)
        or not isinstance(state.get("components", {}), dict)
    ):
        raise CheckpointError(
            f"{str(checkpoint)!r} holds no encoder weights or settings; give the folder or the "
            f"last.pt of a run that `sslplug run` wrote"
        )
    settings = {k: dict(v) for k, v in settings.items()}
    settings["components"] = {**settings.get("components", {}), **state.get("components", {})}
    config = load_config(None, (), registry.settings_classes(), base=settings)
    return Run(checkpoint.parent, checkpoint, state, config)


def build_encoder(
    run: Run,
    registry: PluginRegistry,
    image_size: int,
    num_classes: int,
    device: torch.device,
    pretrained: bool = True,
) -> Encoder:
    """The encoder of ``run``, with its trained weights or (``pretrained=False``) the weights the
    run started from (its random initialisation, or those of ``model.pretrained``), in eval
    mode on ``device``."""
    trained_size = run.state.get("image_size")
    if trained_size is not None and trained_size != image_size:
        raise CheckpointError(
            f"{str(run.checkpoint)!r} was trained on {trained_size}px images, but the data to "
            f"evaluate is {image_size}px; evaluate on data of the same size (for an image folder: "
            f"--set data.image_size={trained_size})"
        )
    # the trained weights replace model.pretrained's, which are loaded only as the baseline
    parts = _parts(run, registry, image_size, num_classes, device, start_weights=not pretrained)
    encoder = parts.encoder
    if pretrained:
        try:
            encoder.load_state_dict(run.state["encoder"])
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            detail = lines[1].strip() if len(lines) > 1 else str(exc)
            raise CheckpointError(
                f"the encoder in {str(run.checkpoint)!r} does not match the one its settings "
                f"build (components {run.components}): {detail}"
            ) from None
    return encoder.to(device).eval()


def _parts(
    run: Run,
    registry: PluginRegistry,
    image_size: int,
    num_classes: int,
    device: torch.device,
    start_weights: bool = False,
) -> Any:
    """The run's components as its settings build them, from the random state it started
    from (the assembly every command shares)."""
    init_rng = run.state.get("init_rng")
    if init_rng is None:  # a checkpoint from before init_rng was saved: the same seed, not draw
        seed_everything(run.config.train.seed)
    return assemble(
        run.config,
        registry,
        image_size=image_size,
        device=device,
        num_classes=num_classes,
        out_dir=run.run_dir,
        init_rng=init_rng,
        train=False,
        start_weights=start_weights,
    ).parts


def build_views(
    run: Run, registry: PluginRegistry, image_size: int, num_classes: int, device: torch.device
) -> nn.Module:
    """The view generator of ``run`` (with its checkpointed state, if it has any), on
    ``device``: for measures that need augmented views of the data, such as the alignment."""
    views = _parts(run, registry, image_size, num_classes, device).views
    if run.state.get("views"):
        views.load_state_dict(run.state["views"])
    return views.to(device)


def _note_path(run: Run, out: Path, force: bool) -> Path:
    """The path of the settings note beside the backbone ``out``, once both paths are known
    free to write (see ``export_backbone``); raises ``OutputError`` otherwise."""
    if out.suffix.lower() == ".json" and not out.is_dir():
        raise OutputError(
            f"{str(out)!r} ends in .json, the name of the settings note written beside the "
            f"backbone (the backbone's path with the suffix .json); name the backbone "
            f"{str(out.with_suffix('.pt'))!r}, for instance"
        )
    run_files = (run.checkpoint, *(run.run_dir / name for name in MARKERS))
    check_new_file(out, force, keep=run_files)
    note_path = out.with_suffix(".json")
    check_new_file(note_path, force, keep=run_files)
    return note_path


def _state_bytes(net: nn.Module) -> bytes:
    """The backbone's state dict (its ``exported_state_dict`` where it has one) on the CPU,
    saved with ``torch.save`` in memory first, so that a failed write is an ``OSError``."""
    exported = getattr(net, "exported_state_dict", net.state_dict)()
    state = {k: v.detach().cpu().clone() for k, v in exported.items()}
    backbone_file = io.BytesIO()
    torch.save(state, backbone_file)
    return backbone_file.getvalue()


def _timm_recipe(net: nn.Module, timm_name: str) -> tuple[list[str], dict[str, Any]]:
    """The lines that rebuild a timm backbone, and the note's entries on the timm model and
    how to read its features."""
    args: dict[str, Any] = dict(getattr(net, "timm_args", {}))
    load = [
        "import timm",
        f"net = timm.create_model({timm_name!r}, num_classes=0, **{args!r})",
    ]
    extra: dict[str, Any] = {"timm_name": timm_name, "timm_args": args}
    pool = getattr(net, "pool", None)
    if pool == "token":
        extra["features"] = "the class token: net.forward_features(x)[:, 0]"
    elif pool == "avg":
        extra["features"] = (
            "the mean patch token: net.forward_features(x)[:, net.num_prefix_tokens:].mean(1)"
        )
    return load, extra


def _load_recipe(
    net: nn.Module, backbone: str, cifar_stem: bool, filename: str
) -> tuple[list[str], dict[str, Any]]:
    """The lines of Python that load the exported backbone ``filename`` into a fresh network,
    and the note's extra entries (for a timm backbone)."""
    timm_name = getattr(net, "timm_name", None)
    extra: dict[str, Any] = {}
    if timm_name is not None:
        load, extra = _timm_recipe(net, timm_name)
    elif backbone == "small":
        load = ["from sslplug.nn import SmallConvNet", "net = SmallConvNet()"]
    else:
        load = [f"net = torchvision.models.{backbone}()"]
        if cifar_stem:
            load.append(
                "net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = nn.Identity()"
            )
        load.append("net.fc = nn.Identity()")
    load.append(f"net.load_state_dict(torch.load({filename!r}, weights_only=True))")
    return load, extra


def _has_cifar_stem(net: nn.Module, config: RunConfig, image_size: int) -> bool:
    """Whether the ResNet ``net`` has the CIFAR stem (a timm model or the small ConvNet has
    none to speak of)."""
    stem = stem_choice(config.model.cifar_stem, config.model.pretrained)
    return (
        getattr(net, "timm_name", None) is None
        and config.model.backbone != "small"
        and uses_cifar_stem(stem, image_size)
    )


def export_backbone(
    run: Run,
    encoder: Encoder,
    out: str | Path,
    image_size: int,
    force: bool = False,
    format: str = "state_dict",
) -> Path:
    """Write ``encoder.backbone`` to ``out`` and a note of its settings beside it (``out`` with
    the suffix ``.json``, so ``out`` itself may not end in ``.json``); return the note's path.

    ``format``: ``"state_dict"``, its weights saved with ``torch.save``, or ``"onnx"``, the
    backbone as an ONNX model of images to pooled features (``sslplug.onnx_export``; needs the
    extra ``sslplug[onnx]``).

    Both files are written atomically (see ``sslplug.outputs``): a failure leaves neither
    behind. An existing file is replaced only with ``force``; an sslplug checkpoint or a file
    of the run (its checkpoint, ``settings.toml``, ``summary.json``) never is. Raises
    ``OutputError`` saying which file could not be written and why.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(
            f"export format {format!r} is not valid; valid: {', '.join(EXPORT_FORMATS)}"
        )
    out = Path(out)
    note_path = _note_path(run, out, force)
    net = encoder.backbone
    config = run.config
    backbone = config.model.backbone
    cifar_stem = _has_cifar_stem(net, config, image_size)
    load, extra = _load_recipe(net, backbone, cifar_stem, out.name)
    if format == "onnx":
        content, checked = onnx_model(net, image_size)
        extra.pop("features", None)  # the output is the features; onnx_note says which token
        model = {**onnx_note(net, out.name, image_size, encoder.feature_dim), **checked}
        use: dict[str, Any] = {}
    else:
        content, model, use = _state_bytes(net), {"input": _STATE_DICT_INPUT}, {"load": load}
    note = {
        "format": "onnx" if format == "onnx" else "sslplug-backbone",
        "backbone": backbone,
        **extra,
        "cifar_stem": cifar_stem,
        "image_size": image_size,
        "feature_dim": encoder.feature_dim,
        **model,
        "components": run.components,
        "epochs_trained": run.epoch,
        "source_checkpoint": str(run.checkpoint),
        **use,
        "settings": config.to_dict(config.used_plugin_sections()),
    }
    write_atomically({out: content, note_path: (json.dumps(note, indent=2) + "\n").encode()})
    return note_path
