"""Settings of a run: attrs classes, read from TOML and ``--set section.key=value``.

A run's settings are the core sections below plus one section per plugin, named after the
plugin, holding the attrs instance its ``sslplug_settings`` hook declared; the core's own
monitors (``knn``, ``health``, ``tensorboard``) declare theirs the same way. Values are checked
against each field's type (``sslplug.settings_values``); unknown sections, unknown keys and bad
values raise one ``ConfigError`` that names each of them, on a line of its own, with what is
valid. ``RunConfig.to_dict`` gives plain data that ``tomli_w``
writes as the run's ``settings.toml``, which ``load_config`` reads back unchanged.

Settings that moved keep their old names (``MOVED``): a config file or ``--set`` that uses one
gets a ``MovedSettingWarning`` naming the new one, and the ``settings.toml`` of a run saved
before the move loads as it is. ``RunContext`` and ``Progress`` live in ``sslplug.context`` and
are re-exported here, where they were first.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

from sslplug.context import Progress, RunContext
from sslplug.errors import ConfigError
from sslplug.settings_values import (
    Problems,
    build_section,
    coerce,
    fields_of,
    parse_assignment,
    read_toml,
    unknown,
)
from sslplug.validate import non_negative, positive

__all__ = [
    "COMPONENTS",
    "MOVED",
    "ComponentSettings",
    "DataSettings",
    "ModelSettings",
    "MovedSettingWarning",
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
_S = TypeVar("_S")


# Seeds a run accepts: Python's random, torch.manual_seed and NumPy take them all, and the
# per-rank and per-step seeds derived from them (seed * 7919 + rank + step) stay within 64 bits.
SEED_RANGE = range(2**32)


# The validators (these and sslplug.validate's) are written as "not (value > 0)" so that a NaN,
# for which every comparison is false, is refused too; coerce already refuses NaN and infinities
# for every float setting read from a file or --set, these also hold for settings built in Python.
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


def _data_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    # an empty name would be the path '', which Path reads as the current folder
    if not value.strip():
        # the data sets by name are sslplug.data.SOURCES, imported here only for the message:
        # the data package imports torch, torchvision and this module
        from sslplug.data.sources import PATHS, SOURCES

        valid = f"{', '.join(SOURCES)}, or {PATHS}"
        raise ConfigError(f"data.name must name a data set, got {value!r}; valid: {valid}")


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
    workers: int = attrs.field(default=2, validator=non_negative)
    strict: bool = False
    cache_gb: float = attrs.field(default=4.0, validator=non_negative)
    test_fraction: float = attrs.field(default=0.1, validator=_fraction)


def _backbone_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    from sslplug.nn import BACKBONES
    from sslplug.vit import TIMM_PREFIX, VIT_PRESETS

    if value in BACKBONES or value in VIT_PRESETS or value.startswith(TIMM_PREFIX):
        return
    valid = ", ".join([*BACKBONES, *VIT_PRESETS, "timm:NAME"])
    raise ConfigError(f"model.backbone {value!r} is not valid; valid: {valid}")


def _weights_source(instance: Any, attribute: attrs.Attribute, value: bool | str) -> None:
    if isinstance(value, str) and not value.strip():
        raise ConfigError(
            "model.pretrained '' is not valid; valid: false, true (the published weights) or "
            "the path of a weights file, an export or a run folder"
        )


@attrs.define
class ModelSettings:
    """The backbone.

    ``backbone``: ``small``, ``resnet18``, ``resnet34``, ``resnet50`` (torchvision), a Vision
    Transformer preset (``vit_tiny``, ``vit_small``, ``vit_micro``) or ``timm:NAME`` for any
    timm model (``sslplug.vit``). ``cifar_stem``: 3x3 stride-1 first conv and no max-pool, for
    small images (ResNets). For ViTs: ``patch_size`` (0: an eighth of the image side up to 16
    px for presets, the timm model's own for ``timm:``), ``drop_path_rate`` (stochastic depth),
    ``registers`` (register tokens, Darcet et al. 2024: learned tokens beside the class token
    that no evaluation reads; 0: the model's own, none for the presets),
    and ``pool``, the features that evaluation reads: the class token (``token``), the mean
    patch token (``avg``), or ``auto`` (the class token, or the mean where the method says so:
    I-JEPA, whose class token is never trained).

    ``pretrained``: where the backbone's weights start. ``false``: the random initialisation
    of the seed. ``true``: the weights torchvision or timm publishes for the model, through that
    library's own download and cache (the CIFAR stem is then off unless ``cifar_stem = "on"``).
    A path: a state dict or timm checkpoint (``.pt``, ``.pth``, ``.safetensors``), the file
    ``sslplug export`` wrote, or a run folder or its ``last.pt`` (``sslplug.weights``). Loading
    is strict, and a ViT's position embeddings are resampled to its grid.
    """

    backbone: str = attrs.field(default="small", validator=_backbone_name)
    cifar_stem: Literal["auto", "on", "off"] = "auto"
    patch_size: int = attrs.field(default=0, validator=non_negative)
    drop_path_rate: float = attrs.field(default=0.0, validator=_fraction)
    registers: int = attrs.field(default=0, validator=non_negative)
    pool: Literal["auto", "token", "avg"] = "auto"
    pretrained: bool | str = attrs.field(default=False, validator=_weights_source)


def _decay(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"optim.{attribute.name} {value!r} must be in (0, 1] (1: no decay)")


@attrs.define
class OptimSettings:
    """Optimizer and schedule: linear warm-up over ``warmup_epochs``, then cosine decay to
    ``lr_floor`` times ``lr`` (0 by default), in every cycle of ``train.cycles``.

    For continued pre-training from weights (``model.pretrained``): the backbone learns at
    ``backbone_lr_scale`` times the rate of the rest, and with ``layer_decay`` below 1 each of
    its layers at that times the rate of the layer above (``sslplug.nn.backbone_layers``
    says what a layer is), so that the first layers move least. Both 1: one rate for all.
    """

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = attrs.field(default=2e-3, validator=positive)
    weight_decay: float = attrs.field(default=1e-4, validator=non_negative)
    momentum: float = 0.9
    warmup_epochs: float = attrs.field(default=1.0, validator=non_negative)
    lr_floor: float = attrs.field(default=0.0, validator=_fraction)
    backbone_lr_scale: float = attrs.field(default=1.0, validator=non_negative)
    layer_decay: float = attrs.field(default=1.0, validator=_decay)


@attrs.define
class TrainSettings:
    """The loop. ``device = "auto"`` takes CUDA when present; ``precision = "auto"`` is bf16 on
    CUDA and on CPUs with native bf16 (AMX or AVX512-BF16), fp32 on other CPUs.

    ``channels_last`` stores convolution weights NHWC, which is faster on CPUs (about 1.6x for
    the small backbone here) and on tensor cores. ``disable`` names lifecycle plugins to switch
    off for this run (the core's ``tensorboard``, ``progress``, ``knn``, ``health``,
    ``view_grid``, or an installed one); ``sslplug run --disable NAME`` adds to it, and
    ``progress = false``, the deprecated name of ``disable = ["progress"]``, still adds
    ``progress``.
    ``compile`` runs ``torch.compile`` on the encoder and the target update. ``max_minutes``
    (0: no limit) ends a session after the epoch in which that many minutes of it passed.
    ``stop_on_collapse`` ends a run whose embeddings collapsed (the health monitor's rule),
    keeping the checkpoint of the last good epoch. ``keep_freed_memory`` lets the process keep
    the large blocks it frees for the next step (glibc's ``mallopt``; see
    ``sslplug.runtime.keep_freed_memory``), where glibc would hand them back to the system and
    zero them again at every step.
    ``cycles`` are the schedules' cycles, ``[start, end]`` epochs each (empty: one over
    ``epochs``; ``sslplug.optim.Cycles``); ``extend`` says what ``--resume RUN --epochs N`` does
    with epochs added to a run's plan: ``restart`` adds a cycle over them (warm-up, cosine),
    ``continue`` holds the schedules' end values (``sslplug.resume.extended_cycles``).
    ``strategy`` says how the ranks of ``torchrun`` hold the model: ``ddp`` a whole copy on
    each, ``fsdp`` the encoder and the target network sharded over them (``sslplug.fsdp``).
    """

    epochs: int = attrs.field(default=15, validator=positive)
    batch_size: int = attrs.field(default=256, validator=positive)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = attrs.field(default=0, validator=_seed)
    out: str = ""
    log_every: int = attrs.field(default=20, validator=positive)
    channels_last: bool = True
    max_steps_per_epoch: int = attrs.field(default=0, validator=non_negative)
    sync_batchnorm: bool = False
    disable: tuple[str, ...] = ()
    compile: bool = False
    max_minutes: float = attrs.field(default=0.0, validator=non_negative)
    stop_on_collapse: bool = False
    keep_freed_memory: bool = True
    cycles: tuple[tuple[int, int], ...] = ()
    extend: Literal["restart", "continue"] = "restart"
    strategy: Literal["ddp", "fsdp"] = "ddp"


CORE_SECTIONS: dict[str, type] = {
    "components": ComponentSettings,
    "data": DataSettings,
    "model": ModelSettings,
    "optim": OptimSettings,
    "train": TrainSettings,
}

# The sections of the core's own monitors, which their registry adds: a run saves them beside
# the core's (what `sslplug eval` measures with, what a resume continues with).
MONITOR_SECTIONS = ("tensorboard", "knn", "health")

# Settings that moved to the section of the core monitor that reads them, by their old name.
MOVED: dict[str, tuple[str, ...]] = {
    "eval.knn_k": ("knn.k",),
    "eval.knn_temperature": ("knn.temperature",),
    "eval.every": ("knn.every", "health.every"),
    "eval.baseline": ("knn.baseline", "health.baseline"),
    "eval.health_samples": ("health.samples",),
    "eval.embedding_samples": ("tensorboard.embedding_samples",),
}
# the old name of ``train.disable = ["progress"]``: ``false`` adds ``progress`` to it
PROGRESS = "train.progress"
SAVED = "the saved settings"  # where the settings of ``load_config``'s ``base`` come from


class MovedSettingWarning(DeprecationWarning):
    """A setting given under an old name (``MOVED``, ``train.progress``); it still works."""


@attrs.define
class RunConfig:
    """All settings of a run: the core sections and one section per plugin with settings."""

    components: ComponentSettings = attrs.Factory(ComponentSettings)
    data: DataSettings = attrs.Factory(DataSettings)
    model: ModelSettings = attrs.Factory(ModelSettings)
    optim: OptimSettings = attrs.Factory(OptimSettings)
    train: TrainSettings = attrs.Factory(TrainSettings)
    plugins: dict[str, Any] = attrs.Factory(dict)

    def section(self, name: str) -> Any:
        if name in CORE_SECTIONS:
            return getattr(self, name)
        return self.plugins.get(name)

    def settings_of(self, name: str, cls: type[_S]) -> _S:
        """Plugin section ``name``, a ``cls``; the defaults, ``cls()``, when the settings were
        read without that class (``load_config`` not given the registry's
        ``settings_classes``): how the core's monitors read their own sections."""
        settings = self.plugins.get(name)
        return settings if isinstance(settings, cls) else cls()

    def used_plugin_sections(self, lifecycle: Iterable[str] = ()) -> list[str]:
        """The plugins that supply this run's components, or take part in it through the
        lifecycle hooks (``lifecycle``: a logger or monitor with settings of its own, the core's
        monitors always), and have settings, sorted.

        A run's saved settings need these sections and no others: a section of a plugin the run
        does not use would make the run impossible to load once that plugin is uninstalled.
        """
        used = set(self.components.resolved().values()) | set(lifecycle) | set(MONITOR_SECTIONS)
        return sorted((used - {NO_TARGET}) & set(self.plugins))

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


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_tuples_to_lists(v) for v in value]
    return value


# the sections that moved away whole: their old keys are read, nothing else
_OLD_SECTIONS = {name.split(".")[0] for name in MOVED} - set(CORE_SECTIONS)


@attrs.define
class _Merged:
    """The tables read so far, by section: each source merged over the ones before.

    Attributes:
        sections: the settings class of every section there is (core and plugins).
        tables: ``{section: {key: value}}`` as read, before the values are checked.
        given_as: the old name a value was given under (``MOVED``), which its errors name.
        progress: the last value of the old ``train.progress``.
        moved: a message for every old name a config file or ``--set`` used.
        problems: every unknown section or key and bad value met so far; reading goes on past
            each, so that ``load_config`` reports them all together.
    """

    sections: Mapping[str, type]
    tables: dict[str, dict[str, Any]] = attrs.Factory(dict)
    given_as: dict[str, dict[str, str]] = attrs.Factory(dict)
    progress: bool = True
    moved: list[str] = attrs.Factory(list)
    problems: Problems = attrs.Factory(Problems)

    def merge(self, source: Mapping[str, Any], origin: str) -> None:
        """Merge the tables of ``source``, a config file or ``SAVED``, over those before."""
        for section, table in source.items():
            with self.problems.noting():
                if section not in self.sections and section not in _OLD_SECTIONS:
                    raise unknown(f"settings section in {origin}", section, self.sections)
                if not isinstance(table, Mapping):
                    raise ConfigError(f"{origin}: [{section}] must be a table of key = value")
                for key, value in table.items():
                    with self.problems.noting():
                        self.put(section, key, value, origin)

    def assign(self, text: str) -> None:
        """Merge one ``--set section.key=value``."""
        with self.problems.noting():
            section, key, (value, raw) = parse_assignment(text)
            if section not in self.sections and section not in _OLD_SECTIONS:
                raise unknown("settings section", section, self.sections)
            fields = fields_of(self.sections[section]) if section in self.sections else {}
            if key in fields and fields[key].type is str and not isinstance(value, str):
                value = raw
            self.put(section, key, value, "--set")

    def put(self, section: str, key: str, value: Any, origin: str) -> None:
        """Set one value, under its new name when ``section.key`` is an old one."""
        name = f"{section}.{key}"
        if name not in MOVED and name != PROGRESS:
            if section in _OLD_SECTIONS:
                old_keys = [old.split(".")[1] for old in MOVED if old.startswith(f"{section}.")]
                raise unknown(f"key in [{section}]", key, old_keys)
            self.tables.setdefault(section, {})[key] = value
            self.given_as.get(section, {}).pop(key, None)
            return
        new = MOVED.get(name, ("--disable progress",))
        if origin != SAVED:
            where = f"--set {name}" if origin == "--set" else f"{name} in {origin}"
            self.moved.append(
                f"{where} is deprecated and will be removed; use {' and '.join(new)} instead"
            )
        if name == PROGRESS:
            self.progress = coerce(value, bool, name)
            return
        for moved_to in new:
            new_section, new_key = moved_to.split(".")
            if new_section not in self.sections:
                if origin == SAVED:
                    continue  # that monitor is not registered: its saved settings are not needed
                raise ConfigError(
                    f"{name} is now {moved_to}, and no plugin {new_section!r} "
                    f"with settings is registered"
                )
            self.tables.setdefault(new_section, {})[new_key] = value
            self.given_as.setdefault(new_section, {})[new_key] = name

    def build(self, section: str) -> Any:
        """The settings of ``section``: its class filled with the values read, checked; its
        defaults, with the errors noted in ``problems``, when a value is bad."""
        cls = self.sections[section]
        with self.problems.noting():
            return build_section(
                cls, self.tables.get(section, {}), section, self.given_as.get(section)
            )
        return cls()


def load_config(
    config_file: str | Path | None = None,
    assignments: Iterable[str] = (),
    plugin_settings: Mapping[str, type] | None = None,
    base: Mapping[str, Mapping[str, Any]] | None = None,
) -> RunConfig:
    """Build a ``RunConfig``: defaults, then ``base``, then the TOML file, then assignments.

    An unknown section is an error, except in ``base``: there, the section of a plugin that is
    not installed is left out with a warning when the resulting run uses none of that plugin's
    components (older runs saved the section of every plugin installed at the time). A setting
    under its old name (``MOVED``, ``train.progress``) sets the new one, with a
    ``MovedSettingWarning`` when it comes from the file or the assignments. Every unknown
    section or key and bad value of the sources is reported in one ``ConfigError``, a line
    each.

    Args:
        config_file: a TOML file with one table per section.
        assignments: ``section.key=value`` strings (``--set``), applied last.
        plugin_settings: settings class of each plugin that declares one, by plugin name.
        base: settings already in effect (a resumed run's ``settings.toml``).
    """
    plugin_settings = dict(plugin_settings or {})
    merged = _Merged({**CORE_SECTIONS, **plugin_settings})
    uninstalled: list[str] = []
    if base:
        uninstalled = [s for s in base if s not in merged.sections and s not in _OLD_SECTIONS]
        merged.merge({k: v for k, v in base.items() if k not in uninstalled}, SAVED)
    if config_file is not None:
        merged.merge(read_toml(config_file), str(config_file))
    for text in assignments:
        merged.assign(text)
    for message in merged.moved:
        warnings.warn(message, MovedSettingWarning, stacklevel=2)

    core = {name: merged.build(name) for name in CORE_SECTIONS}
    if not merged.progress:
        core["train"].disable = tuple(dict.fromkeys([*core["train"].disable, "progress"]))
    used = set(core["components"].resolved().values())
    for section in uninstalled:
        if section in used:
            with merged.problems.noting():
                raise unknown(f"settings section in {SAVED}", section, merged.sections)
            continue
        log.warning(
            "leaving out [%s] of %s: plugin %r is not installed and this run uses none of its "
            "components",
            section,
            SAVED,
            section,
        )
    plugins = {name: merged.build(name) for name in plugin_settings}
    merged.problems.raise_any()
    return RunConfig(**core, plugins=plugins)
