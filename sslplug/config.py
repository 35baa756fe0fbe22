"""Settings of a run: attrs classes, read from TOML and ``--set section.key=value``.

A run's settings are the core sections below plus one section per plugin, named after the
plugin, holding the attrs instance its ``sslplug_settings`` hook declared. Values are checked
against each field's type; an unknown key or a bad value raises ``ConfigError`` listing what is
valid. ``RunConfig.to_dict`` gives plain data that ``tomli_w`` writes as the run's
``settings.toml``, which ``load_config`` reads back unchanged.
"""

from __future__ import annotations

import difflib
import logging
import math
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sslplug.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if typing.TYPE_CHECKING:
    import torch

__all__ = [
    "COMPONENTS",
    "ComponentSettings",
    "DataSettings",
    "EvalSettings",
    "ModelSettings",
    "OptimSettings",
    "Progress",
    "RunConfig",
    "RunContext",
    "TrainSettings",
    "check_seed",
    "load_config",
    "parse_assignment",
    "read_toml",
]

COMPONENTS = ("augmentation", "views", "encoder", "loss", "target_update")
NO_TARGET = "none"  # components.target_update for a run without a target network

log = logging.getLogger(__name__)


# Seeds a run accepts: Python's random, torch.manual_seed and NumPy take them all, and the
# per-rank and per-step seeds derived from them (seed * 7919 + rank + step) stay within 64 bits.
SEED_RANGE = range(2**32)


# Written as "not (value > 0)" so that a NaN, for which every comparison is false, is refused
# too; _coerce already refuses NaN and infinities for every float setting read from a file or
# --set, these also hold for settings built in Python.
def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be greater than 0, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{attribute.name} must be 0 or more, got {value!r}")


def _fraction(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{attribute.name} must be at least 0 and below 1, got {value!r}")


def _image_size(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value != 0 and not 8 <= value <= 1024:
        raise ConfigError(
            f"image_size must be 0 (the data set's default) or between 8 and 1024 pixels, "
            f"got {value!r}"
        )


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 1.0 or value > 8.0:
        raise ConfigError(f"{attribute.name} must be between 1 and 8, got {value!r}")


def check_seed(value: int, name: str = "seed") -> None:
    """Refuse a seed outside ``SEED_RANGE``, naming it as ``name`` (a setting or a flag)."""
    if value not in SEED_RANGE:
        raise ConfigError(
            f"{name} must be a whole number from 0 to {SEED_RANGE.stop - 1} "
            f"(0 <= seed < 2**32), got {value!r}"
        )


def _seed(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    check_seed(value, attribute.name)


# what data.name may be, for the message refusing an empty one (sslplug.data.BUILTIN)
_DATA_NAMES = (
    "shapes, cifar10, cifar100, stl10, or the path of an image folder, of a folder written by "
    "sslplug prepare, or of WebDataset shards (.tar)"
)


def _data_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    # an empty name would be the path '', which Path reads as the current folder
    if not value.strip():
        raise ConfigError(f"data.name must name a data set, got {value!r}; valid: {_DATA_NAMES}")


@attrs.define
class ComponentSettings:
    """Which plugin supplies each component.

    ``plugin`` supplies every component not named otherwise; an empty string means "from
    ``plugin``". ``target_update = "none"`` runs without a target network.
    """

    plugin: str = "byol"
    augmentation: str = ""
    views: str = ""
    encoder: str = ""
    loss: str = ""
    target_update: str = ""

    def resolved(self) -> dict[str, str]:
        """The plugin name for each component (``"none"`` allowed for the target update)."""
        return {name: getattr(self, name) or self.plugin for name in COMPONENTS}


@attrs.define
class DataSettings:
    """Where images come from.

    ``name`` is ``shapes`` (the embedded default), ``cifar10``, ``cifar100``, ``stl10``, the
    path of an image folder (class subfolders give labels, a flat folder is unlabelled, images
    beside class subfolders are an error, ``train/`` and ``test/`` subfolders are used as the
    splits when present), of a folder that ``sslplug prepare`` wrote, or of WebDataset shards
    (a ``.tar`` file, or a folder of them).

    ``image_size`` is the side of the crops the views are made at (0: the data set's default:
    32 for shapes and CIFAR, 96 for STL-10, 64 for image folders and shards; 8 to 1024).
    Images of a folder keep their own resolution up to ``store_scale`` times that side (the
    shorter side is resized to at most ``ceil(store_scale * image_size)``), and crops are taken
    from there, batched on the device (``docs/data.md``).
    """

    name: str = attrs.field(default="shapes", validator=_data_name)
    root: str = ""
    download: bool = False
    image_size: int = attrs.field(default=0, validator=_image_size)
    store_scale: float = attrs.field(default=1.15, validator=_at_least_one)
    workers: int = attrs.field(default=2, validator=_non_negative)
    strict: bool = False
    cache_gb: float = attrs.field(default=4.0, validator=_non_negative)
    test_fraction: float = attrs.field(default=0.1, validator=_fraction)


def _backbone_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    from sslplug.nn import BACKBONES
    from sslplug.vit import TIMM_PREFIX, VIT_PRESETS

    if value in BACKBONES or value in VIT_PRESETS or value.startswith(TIMM_PREFIX):
        return
    valid = ", ".join([*BACKBONES, *VIT_PRESETS, "timm:NAME"])
    raise ConfigError(f"model.backbone {value!r} is not valid; valid: {valid}")


@attrs.define
class ModelSettings:
    """The backbone.

    ``backbone``: ``small``, ``resnet18``, ``resnet34``, ``resnet50`` (torchvision), a Vision
    Transformer preset (``vit_tiny``, ``vit_small``, ``vit_micro``) or ``timm:NAME`` for any
    timm model (``sslplug.vit``). ``cifar_stem``: 3x3 stride-1 first conv and no max-pool, for
    small images (ResNets). For ViTs: ``patch_size`` (0: an eighth of the image side up to 16
    px for presets, the timm model's own for ``timm:``), ``drop_path_rate`` (stochastic depth),
    and ``pool``, the features that evaluation reads: the class token (``token``), the mean
    patch token (``avg``), or ``auto`` (the class token, or the mean where the method says so:
    I-JEPA, whose class token is never trained).
    """

    backbone: str = attrs.field(default="small", validator=_backbone_name)
    cifar_stem: Literal["auto", "on", "off"] = "auto"
    patch_size: int = attrs.field(default=0, validator=_non_negative)
    drop_path_rate: float = attrs.field(default=0.0, validator=_fraction)
    pool: Literal["auto", "token", "avg"] = "auto"


@attrs.define
class OptimSettings:
    """Optimizer and schedule: linear warm-up over ``warmup_epochs``, then cosine decay to 0."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = attrs.field(default=2e-3, validator=_positive)
    weight_decay: float = attrs.field(default=1e-4, validator=_non_negative)
    momentum: float = 0.9
    warmup_epochs: float = attrs.field(default=1.0, validator=_non_negative)


@attrs.define
class TrainSettings:
    """The loop. ``device = "auto"`` takes CUDA when present; ``precision = "auto"`` is bf16 on
    CUDA and on CPUs with native bf16 (AMX or AVX512-BF16), fp32 on other CPUs.

    ``channels_last`` stores convolution weights NHWC, which is faster on CPUs (about 1.6x for
    the small backbone here) and on tensor cores. ``disable`` names lifecycle plugins to switch
    off for this run (the core's ``tensorboard``, ``progress``, ``knn``, ``health``,
    ``view_grid``, or an installed one); ``sslplug run --disable NAME`` adds to it.
    ``compile`` runs ``torch.compile`` on the encoder and the target update. ``max_minutes``
    (0: no limit) ends a session after the epoch in which that many minutes of it passed.
    ``stop_on_collapse`` ends a run whose embeddings collapsed (the health monitor's rule),
    keeping the checkpoint of the last good epoch.
    """

    epochs: int = attrs.field(default=15, validator=_positive)
    batch_size: int = attrs.field(default=256, validator=_positive)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = attrs.field(default=0, validator=_seed)
    out: str = ""
    log_every: int = attrs.field(default=20, validator=_positive)
    progress: bool = True
    channels_last: bool = True
    max_steps_per_epoch: int = attrs.field(default=0, validator=_non_negative)
    sync_batchnorm: bool = False
    disable: tuple[str, ...] = ()
    compile: bool = False
    max_minutes: float = attrs.field(default=0.0, validator=_non_negative)
    stop_on_collapse: bool = False


@attrs.define
class EvalSettings:
    """Weighted kNN on frozen features (Wu et al. 2018): train split as memory, test as queries.

    Runs before training (the randomly initialised encoder, ``baseline``), every ``every``
    epochs (0: only at the end) and at the end. At the end, the features of
    ``embedding_samples`` test images (0: none) go to TensorBoard's embedding projector. The
    health monitor measures the label-free health of the features (effective rank, spread,
    alignment, uniformity) on ``health_samples`` training images (0: off) at the same epochs.
    """

    knn_k: int = attrs.field(default=200, validator=_positive)
    knn_temperature: float = attrs.field(default=0.1, validator=_positive)
    every: int = attrs.field(default=5, validator=_non_negative)
    baseline: bool = True
    embedding_samples: int = attrs.field(default=1000, validator=_non_negative)
    health_samples: int = attrs.field(default=1024, validator=_non_negative)


CORE_SECTIONS: dict[str, type] = {
    "components": ComponentSettings,
    "data": DataSettings,
    "model": ModelSettings,
    "optim": OptimSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
}


@attrs.define
class RunConfig:
    """All settings of a run: the core sections and one section per plugin with settings."""

    components: ComponentSettings = attrs.Factory(ComponentSettings)
    data: DataSettings = attrs.Factory(DataSettings)
    model: ModelSettings = attrs.Factory(ModelSettings)
    optim: OptimSettings = attrs.Factory(OptimSettings)
    train: TrainSettings = attrs.Factory(TrainSettings)
    eval: EvalSettings = attrs.Factory(EvalSettings)
    plugins: dict[str, Any] = attrs.Factory(dict)

    def section(self, name: str) -> Any:
        if name in CORE_SECTIONS:
            return getattr(self, name)
        return self.plugins.get(name)

    def used_plugin_sections(self, lifecycle: Iterable[str] = ()) -> list[str]:
        """The plugins that supply this run's components, or take part in it through the
        lifecycle hooks (``lifecycle``: a logger or monitor with settings of its own), and have
        settings, sorted.

        A run's saved settings need these sections and no others: a section of a plugin the run
        does not use would make the run impossible to load once that plugin is uninstalled.
        """
        used = (set(self.components.resolved().values()) | set(lifecycle)) - {NO_TARGET}
        return sorted(used & set(self.plugins))

    def to_dict(self, sections: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Plain nested data (TOML-writable): ``{section: {key: value}}``.

        Every core section, and the plugin sections named in ``sections`` (all of them when
        ``None``); ``to_dict(used_plugin_sections())`` is what a run saves.
        """
        chosen = set(self.plugins) if sections is None else set(sections)
        out = {name: attrs.asdict(getattr(self, name)) for name in CORE_SECTIONS}
        for name, settings in sorted(self.plugins.items()):
            if name in chosen:
                out[name] = attrs.asdict(settings)
        return _tuples_to_lists(out)


@attrs.define
class Progress:
    """Where training stands; the core updates it before every step.

    Attributes:
        step: optimizer steps finished so far (the 0-based index of the step about to run).
        epoch: epochs finished so far (the 0-based index of the epoch in progress).
        steps_per_epoch, total_steps: of the whole run.
    """

    step: int = 0
    epoch: int = 0
    steps_per_epoch: int = 1
    total_steps: int = 1

    @property
    def epoch_float(self) -> float:
        """Epochs done, with the fraction of the current one (1.5: half-way through epoch 2)."""
        return self.step / max(1, self.steps_per_epoch)

    @property
    def fraction(self) -> float:
        """Share of the run done, from 0 at the first step towards 1."""
        return min(1.0, self.step / max(1, self.total_steps))


@attrs.define
class RunContext:
    """Facts of a run that components may need; passed to every hook as ``run``.

    Attributes:
        config: all settings of the run.
        image_size: side of the square images the loader yields.
        channels: image channels (3).
        num_classes: label classes of the data set (0 when unlabelled).
        device: where training runs.
        steps_per_epoch, total_steps: optimizer steps.
        out_dir: the run folder.
        components: the plugin that supplied each component (``"none"`` for no target update).
        progress: the current step and epoch, updated by the core before every step; a
            component may keep ``run`` and read it for schedules and warm-ups.
        parts: the built components (``sslplug.plugins.Components``), once they are built.
        data: the run's data set (``sslplug.data.DataSet``), when training.
        baseline: what ``sslplug_evaluate`` measured on the random initialisation.
        history: the metrics of every finished epoch, oldest first (restored on resume, so a
            monitor can pick up where it was: the health monitor's collapse rule reads the
            epoch before).
        backbone: the run's backbone, once built (before the components): a view generator
            that draws masks over patches reads its grid (``sslplug.token_backbone``).
        stop_reason: set by ``request_stop``: the run ends after the current epoch, saying why.
        stop_saves: whether that epoch's checkpoint is still written.
    """

    config: RunConfig
    image_size: int
    channels: int = 3
    num_classes: int = 0
    device: torch.device | str = "cpu"
    steps_per_epoch: int = 0
    total_steps: int = 0
    out_dir: Path = Path(".")
    components: dict[str, str] = attrs.Factory(dict)
    progress: Progress = attrs.Factory(Progress)
    parts: Any = None
    data: Any = None
    baseline: dict[str, float] = attrs.Factory(dict)
    history: list[dict[str, float]] = attrs.Factory(list)
    backbone: Any = None
    stop_reason: str = ""
    stop_saves: bool = True

    def request_stop(self, reason: str, save: bool = True) -> None:
        """Ask the loop to end the run after the current epoch, for ``reason`` (shown, and kept
        in ``summary.json``). A lifecycle plugin calls it, typically from
        ``sslplug_evaluate``; with ``save=False`` that epoch's checkpoint is not written, so
        the run folder keeps the previous one (the health monitor does so on collapse)."""
        self.stop_reason = reason
        self.stop_saves = self.stop_saves and save

    def __attrs_post_init__(self) -> None:
        self.progress.steps_per_epoch = max(1, self.steps_per_epoch)
        self.progress.total_steps = max(1, self.total_steps)

    def __deepcopy__(self, memo: dict[int, Any]) -> RunContext:
        """The run is shared, not copied: a component that keeps ``run`` and is deep-copied
        (a target network made from the encoder, fine-tuning's copy) reads the same live
        ``progress`` and does not copy the data set."""
        return self


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_tuples_to_lists(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; return it converted, or raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise bad
        try:
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        except ConfigError as exc:
            raise ConfigError(f"{exc} in {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        # NaN passes every "> 0" check and poisons what it touches; an int past 1.8e308 is inf
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def _fields(cls: type) -> dict[str, attrs.Attribute]:
    attrs.resolve_types(cls)
    return {f.name: f for f in attrs.fields(cls)}


def _unknown(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid) or '(none)'}")


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"key in [{section}]", key, fields)
        kwargs[key] = _coerce(value, fields[key].type, f"{section}.{key}")
    try:
        settings = cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] invalid settings: {exc}") from None
    # after the field's own validator, which can say more (the range of a seed)
    for key, value in kwargs.items():
        _fits_64_bits(value, f"{section}.{key}")
    return settings


def _fits_64_bits(value: Any, key: str) -> None:
    """Refuse a whole number torch cannot take: it would fail deep inside, far from the cause."""
    if isinstance(value, tuple):
        for item in value:
            _fits_64_bits(item, key)
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{key} must fit in 64 bits (at most {2**63 - 1}), got {value!r}")


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` into its parts; the value is read as a TOML value when it
    is one (``0.5``, ``true``, ``[0.1, 0.2]``, ``"text"``) and kept as a string otherwise."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(
            f"--set expects section.key=value with one dot in the name, got {dotted!r}"
        )
    section, key = (part.strip() for part in dotted.split("."))
    raw = raw.strip()
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, (value, raw)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The tables of the TOML file ``path``; ``ConfigError`` naming it as ``what`` when it is
    missing or not TOML. The one place that reads TOML files (``tomli`` before Python 3.11)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load_config(
    config_file: str | Path | None = None,
    assignments: Iterable[str] = (),
    plugin_settings: Mapping[str, type] | None = None,
    base: Mapping[str, Mapping[str, Any]] | None = None,
) -> RunConfig:
    """Build a ``RunConfig``: defaults, then ``base``, then the TOML file, then assignments.

    An unknown section is an error, except in ``base``: there, the section of a plugin that is
    not installed is left out with a warning when the resulting run uses none of that plugin's
    components (older runs saved the section of every plugin installed at the time).

    Args:
        config_file: a TOML file with one table per section.
        assignments: ``section.key=value`` strings (``--set``), applied last.
        plugin_settings: settings class of each plugin that declares one, by plugin name.
        base: settings already in effect (a resumed run's ``settings.toml``).
    """
    plugin_settings = dict(plugin_settings or {})
    valid_sections = {**CORE_SECTIONS, **plugin_settings}
    merged: dict[str, dict[str, Any]] = {}
    base_origin = "the saved settings"

    def merge(source: Mapping[str, Any], origin: str) -> None:
        for section, table in source.items():
            if section not in valid_sections:
                raise _unknown(f"settings section in {origin}", section, valid_sections)
            if not isinstance(table, Mapping):
                raise ConfigError(f"{origin}: [{section}] must be a table of key = value")
            merged.setdefault(section, {}).update(table)

    uninstalled: list[str] = []
    if base:
        uninstalled = [section for section in base if section not in valid_sections]
        merge({k: v for k, v in base.items() if k in valid_sections}, base_origin)
    if config_file is not None:
        merge(read_toml(config_file), str(config_file))
    for text in assignments:
        section, key, (value, raw) = parse_assignment(text)
        if section not in valid_sections:
            raise _unknown("settings section", section, valid_sections)
        fields = _fields(valid_sections[section])
        if key in fields and fields[key].type is str and not isinstance(value, str):
            value = raw
        merge({section: {key: value}}, "--set")

    core = {name: _build(cls, merged.get(name, {}), name) for name, cls in CORE_SECTIONS.items()}
    used = set(core["components"].resolved().values())
    for section in uninstalled:
        if section in used:
            raise _unknown(f"settings section in {base_origin}", section, valid_sections)
        log.warning(
            "leaving out [%s] of %s: plugin %r is not installed and this run uses none of its "
            "components",
            section,
            base_origin,
            section,
        )
    plugins = {
        name: _build(cls, merged.get(name, {}), name) for name, cls in plugin_settings.items()
    }
    return RunConfig(**core, plugins=plugins)
