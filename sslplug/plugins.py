"""The plugin registry: a typed facade over ``pluggy.PluginManager``.

It registers the core's own lifecycle plugins (TensorBoard, progress bar, kNN and health
monitors, view grid), then loads plugins from the entry-point group ``sslplug`` (built-in
methods are listed there too; a name claimed twice gives the other claimant the name
``DISTRIBUTION:NAME``), isolates failures (a plugin that fails to import, to register or to
declare valid settings is reported and left out, unless ``strict``), keeps the capability names
and data sets plugins register, and calls each component hook on exactly the plugin chosen for
it. The rest of the code calls typed methods here rather than ``pm.hook.x(...)``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy
from torch import nn

from sslplug import hookspecs
from sslplug.augment import MultiViewGenerator
from sslplug.capabilities import Capability, check_compatible
from sslplug.components import (
    CAPABILITIES,
    Augmentations,
    Encoder,
    TargetUpdate,
    ViewGenerator,
)
from sslplug.config import COMPONENTS, NO_TARGET, RunConfig, RunContext
from sslplug.errors import ComponentMismatchError, ConfigError, PluginError, SslplugError
from sslplug.lifecycle import LIFECYCLE_HOOKS, Lifecycle
from sslplug.plugin_checks import check_settings, describe_type, qualified_name
from sslplug.settings_values import did_you_mean, one_message

__all__ = [
    "ENTRY_POINT_GROUP",
    "Capability",
    "Components",
    "Lifecycle",
    "PluginFailure",
    "PluginInfo",
    "PluginRegistry",
    "check_compatible",
    "qualified_name",
]

ENTRY_POINT_GROUP = "sslplug"
CORE = "sslplug"  # who registers the core's capabilities and lifecycle plugins

_HOOK_OF = {name: f"sslplug_{name}" for name in COMPONENTS}
_RETURN_TYPE: dict[str, type | tuple[type, ...]] = {
    "augmentation": (list, tuple),
    "views": ViewGenerator,
    "encoder": Encoder,
    "loss": nn.Module,
    "target_update": TargetUpdate,
}

log = logging.getLogger(__name__)


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded: its name, its distribution and why."""

    name: str
    distribution: str | None
    error: str

    def __str__(self) -> str:
        where = f" (distribution {self.distribution})" if self.distribution else ""
        return f"plugin {self.name!r}{where} was left out: {self.error}"


@attrs.frozen
class PluginInfo:
    """What ``sslplug list`` shows of one plugin."""

    name: str
    distribution: str | None
    version: str | None
    components: tuple[str, ...]
    has_settings: bool
    module: str = ""  # the code that runs under this name: the entry point's module (or object)


@attrs.define
class Components:
    """The five components of a run, built, and the plugin that supplied each."""

    augmentations: tuple[nn.Module, ...]
    views: ViewGenerator
    encoder: Encoder
    loss: nn.Module
    target_update: TargetUpdate | None
    sources: dict[str, str]
    # the code behind each component's plugin (``PluginRegistry.origin``), which a run records
    code: dict[str, str] = attrs.Factory(dict)

    def modules(self) -> dict[str, nn.Module | None]:
        """The components whose ``state_dict`` a checkpoint holds, by name."""
        return {
            "views": self.views,
            "encoder": self.encoder,
            "loss": self.loss,
            "target_update": self.target_update,
        }

    def optim_rules(self) -> list[Any]:
        """The optimiser rules the components declared (``sslplug.OptimRules``); the absolute
        ``weight_decay_end`` is deprecated, with a warning naming the component's plugin."""
        rules = []
        for name, module in self.modules().items():
            method = getattr(module, "optim_rules", None)
            rule = method() if callable(method) else None
            if rule is None:
                continue
            if getattr(rule, "weight_decay_end", None) is not None:
                warnings.warn(
                    f"the {name.replace('_', ' ')} of plugin {self.sources.get(name)!r} sets "
                    f"OptimRules(weight_decay_end={rule.weight_decay_end!r}), an absolute end "
                    f"that scales every group by its ratio to optim.weight_decay; give "
                    f"weight_decay_end_factor (the end over each group's own starting decay) "
                    f"instead. The absolute form works until sslplug 0.3",
                    DeprecationWarning,
                    stacklevel=2,
                )
            rules.append(rule)
        return rules


class PluginRegistry:
    """Holds the registered plugins and builds components from them.

    Args:
        strict: raise ``PluginError`` on the first plugin that fails to load, instead of
            reporting it in ``failures`` and carrying on without it.
        internal: register the core's lifecycle plugins (``tensorboard``, ``progress``,
            ``knn``, ``health``, ``view_grid``) first, as pytest registers its own, with the
            settings they declare (``[knn]``, ``[health]``, ``[tensorboard]``).
    """

    def __init__(self, strict: bool = False, internal: bool = True) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._distributions: dict[str, tuple[str | None, str | None]] = {}
        self._settings: dict[str, type] = {}
        self._modules: dict[str, str] = {}
        self._internal: list[str] = []
        self.capabilities: dict[str, Capability] = {
            name: Capability(name, text, CORE) for name, text in CAPABILITIES.items()
        }
        if internal:
            from sslplug.monitors import internal_plugins

            for name, plugin in internal_plugins():
                self.pm.register(plugin, name=name)
                self._internal.append(name)
                settings = check_settings(self._call_one("sslplug_settings", name, {}))
                if settings is not None:
                    self._settings[name] = settings

    # loading -------------------------------------------------------------------------------

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every plugin advertised in the entry-point group.

        A name claimed twice goes to sslplug's own plugin, then to the first distribution in
        alphabetical order; every other claimant is registered under its qualified name
        ``DISTRIBUTION:NAME`` (``sslplug-dino-plus:dino``), so that a name always means one
        piece of code and the other stays usable.
        """

        def order(ep: importlib.metadata.EntryPoint) -> tuple[str, bool, str]:
            dist = ep.dist.name if ep.dist is not None else ""
            return ep.name, dist != "sslplug", dist

        for ep in sorted(importlib.metadata.entry_points(group=group), key=order):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            name = ep.name
            if name in self._internal or self.pm.has_plugin(name):
                if name not in self._internal and self._distributions[name][0] == dist:
                    continue  # the same distribution seen twice on sys.path
                name = qualified_name(dist, ep.name)
                if self.pm.has_plugin(name):
                    continue
            try:
                plugin = ep.load()
            except Exception as exc:
                self._fail(name, dist, f"import of {ep.value!r} failed: {exc!r}")
                continue
            if self.register(plugin, name, distribution=dist, version=version):
                self._modules[name] = ep.value
                if name != ep.name:
                    holder = self._distributions.get(ep.name, (CORE, None))[0] or "sslplug"
                    log.warning(
                        "plugin name %r of distribution %r is taken by %r; it is registered as "
                        "%r: choose it with that name",
                        ep.name,
                        dist,
                        holder,
                        name,
                    )

    def register(
        self,
        plugin: Any,
        name: str,
        distribution: str | None = None,
        version: str | None = None,
    ) -> bool:
        """Register one plugin object under ``name``; return whether it was accepted."""
        if self.pm.has_plugin(name):
            self._fail(name, distribution, "a plugin of that name is already registered")
            return False
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(name, distribution, f"registration failed: {exc}")
            return False
        try:
            self.pm.check_pending()
            settings = check_settings(self._call_one("sslplug_settings", name, {}))
            capabilities = self._collect_capabilities(name)
            self._add_data_sources(name)
        except Exception as exc:
            self.pm.unregister(name=name)
            self._fail(name, distribution, str(exc))
            return False
        if settings is not None:
            self._settings[name] = settings
        for capability in capabilities:
            self.capabilities.setdefault(capability.name, capability)
        self._distributions[name] = (distribution, version)
        return True

    def _collect_capabilities(self, name: str) -> list[Capability]:
        found: list[Capability] = []

        def register(capability: str, description: str) -> None:
            if not isinstance(capability, str) or not capability.isidentifier():
                raise PluginError(
                    f"sslplug_capabilities registered {capability!r}; a capability name is an "
                    f"identifier such as 'global_local_views'"
                )
            known = self.capabilities.get(capability)
            if known is not None and known.plugin != name:
                log.warning(
                    "plugin %r registers capability %r, already registered by %r; keeping theirs",
                    name,
                    capability,
                    known.plugin,
                )
                return
            found.append(Capability(capability, str(description), name))

        self._call_one("sslplug_capabilities", name, {"register": register})
        return found

    def _add_data_sources(self, name: str) -> None:
        """The data sets plugin ``name`` adds through ``sslplug_data_sources``."""
        from sslplug.data.sources import SOURCES, register_source

        def register(source: str, builder: Any, description: str) -> None:
            known = SOURCES.get(source)
            if known is not None and known.builder is builder:
                return  # the same plugin, loaded again by another registry of this process
            if not callable(builder):
                raise PluginError(f"sslplug_data_sources gave {builder!r} for {source!r}")
            register_source(source, builder, str(description))

        self._call_one("sslplug_data_sources", name, {"register": register})

    def _fail(self, name: str, distribution: str | None, error: str) -> None:
        failure = PluginFailure(name, distribution, error)
        if self.strict:
            raise PluginError(str(failure))
        log.warning("%s", failure)
        self.failures.append(failure)

    # queries -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The plugins loaded from entry points or registered by hand (not the core's own)."""
        return sorted(name for name, _ in self.pm.list_name_plugin() if name in self._distributions)

    def internal_names(self) -> list[str]:
        """The core's own lifecycle plugins, which ``--disable NAME`` switches off."""
        return list(self._internal)

    def provides(self, name: str) -> tuple[str, ...]:
        """The components plugin ``name`` implements, in data-flow order."""
        provided = {c for c in COMPONENTS if _HOOK_OF[c] in self._hooks_of(name)}
        if "augmentation" in provided:
            provided.add("views")  # its pipelines come with the default view generator
        return tuple(c for c in COMPONENTS if c in provided)

    def _hooks_of(self, name: str) -> set[str]:
        return {caller.name for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []}

    def info(self) -> list[PluginInfo]:
        return [
            PluginInfo(
                name=name,
                distribution=self._distributions[name][0],
                version=self._distributions[name][1],
                components=self.provides(name),
                has_settings=name in self._settings,
                module=self.module_of(name),
            )
            for name in self.names()
        ]

    def module_of(self, name: str) -> str:
        """The code registered as plugin ``name``: its entry point's value
        (``sslplug_methods.dino``), or the module of an object registered by hand."""
        if name in self._modules:
            return self._modules[name]
        plugin = self.pm.get_plugin(name)
        module = getattr(plugin, "__name__", None) if plugin is not None else None
        return module if isinstance(module, str) else type(plugin).__module__

    def origin(self, name: str) -> str:
        """One line saying which code runs as plugin ``name``: its module and distribution."""
        distribution, version = self._distributions.get(name, (None, None))
        if distribution is None:
            return self.module_of(name)
        release = f" {version}" if version else ""
        return f"{self.module_of(name)} (distribution {distribution}{release})"

    def settings_classes(self) -> dict[str, type]:
        """The settings class of every plugin that declares one, by plugin name."""
        return dict(self._settings)

    def capabilities_of(self, name: str) -> list[Capability]:
        """The capabilities plugin ``name`` registered."""
        return [c for c in self.capabilities.values() if c.plugin == name]

    # building ------------------------------------------------------------------------------

    def _call_one(self, hook: str, name: str, kwargs: dict[str, Any]) -> Any:
        """Call ``hook`` on plugin ``name`` alone; the impl receives the arguments it names."""
        others = [p for n, p in self.pm.list_name_plugin() if n != name]
        caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
        result = caller(**kwargs)
        if caller.spec is not None and caller.spec.opts.get("firstresult"):
            return result
        return result[0] if result else None

    def unknown_plugin(self, name: str, given_as: str) -> PluginError:
        """The error for a plugin ``name`` that is not installed, given as ``given_as`` (``--plugin
        byl``): why it failed to load if it did, that it is one of the core's lifecycle plugins
        (which supply no component), else the closest name; the installed plugins."""
        installed = self.names()
        failed = [f.error for f in self.failures if f.name == name]
        if failed:
            why = f" It failed to load: {failed[0]}"
        elif name in self._internal:
            why = " It is one of the core's lifecycle plugins, which supply no component."
        else:
            why = did_you_mean(name, installed)
        return PluginError(
            f"unknown plugin {name!r} ({given_as}).{why} Installed plugins: "
            f"{', '.join(installed) or '(none)'}"
        )

    def resolve(
        self, config: RunConfig, given_as: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The plugin for each component, checked: installed, and implementing the hook.

        ``given_as`` says how the user named the plugin of each key of ``[components]``
        (``{"plugin": "--plugin byl"}``), for the messages; a key not in it is named as the
        setting, ``components.loss = 'nope'``. Every unknown plugin and every component a plugin
        does not provide is reported, a line each, in one ``PluginError``.
        """
        given_as = given_as or {}
        sources = config.components.resolved()
        problems: dict[str, str] = {}  # by what failed, so that one bad --plugin is one line
        for component, name in sources.items():
            if component == "target_update" and name == NO_TARGET:
                continue
            if name not in self._distributions:
                # the key that holds the name: the component's own, or ``plugin`` for the rest
                key = component if getattr(config.components, component) else "plugin"
                given = given_as.get(key, f"components.{key} = {name!r}")
                problems.setdefault(name, str(self.unknown_plugin(name, given)))
                continue
            if component in self.provides(name):
                continue
            if component == "target_update" and not config.components.target_update:
                sources[component] = NO_TARGET  # the method has no target network
                continue
            offering = [n for n in self.names() if component in self.provides(n)]
            problems[f"{name}.{component}"] = (
                f"plugin {name!r} provides no {component}. Plugins that do: "
                f"{', '.join(offering) or '(none)'}"
            )
        if problems:
            raise PluginError(one_message(list(problems.values()), "component choices"))
        return sources

    def _make(
        self, component: str, config: RunConfig, sources: dict[str, str], **kwargs: Any
    ) -> Any:
        """Call the hook of ``component`` on its plugin and check what comes back."""
        name = sources[component]
        kwargs["settings"] = config.plugins.get(name)
        if component == "views" and _HOOK_OF["views"] not in self._hooks_of(name):
            # the default views: one augmented copy of the batch per pipeline
            return MultiViewGenerator(kwargs["augmentations"])
        try:
            result = self._call_one(_HOOK_OF[component], name, kwargs)
        except ComponentMismatchError as exc:
            chosen = ", ".join(f"{c.replace('_', ' ')} from {sources[c]!r}" for c in COMPONENTS)
            raise ComponentMismatchError(
                f"plugin {name!r} cannot build its {component} for the components chosen "
                f"({chosen}): {exc}"
            ) from exc
        except PluginError:
            raise
        except SslplugError as exc:  # the plugin's own clear error (a setting, a file): kept
            raise type(exc)(f"plugin {name!r}, building its {component}: {exc}") from exc
        except Exception as exc:
            raise PluginError(f"plugin {name!r} failed to build its {component}: {exc!r}") from exc
        if result is None and component == "target_update":
            return None
        expected = _RETURN_TYPE[component]
        if not isinstance(result, expected):
            raise PluginError(
                f"plugin {name!r} returned {type(result).__name__} from {_HOOK_OF[component]}; "
                f"expected {describe_type(expected)}"
            )
        if component == "augmentation" and not isinstance(result, Augmentations):
            warnings.warn(
                f"plugin {name!r} returned a plain {type(result).__name__} from "
                f"sslplug_augmentation; return sslplug.Augmentations(pipelines, provides=...) to "
                f"declare what the pipelines produce (taken to be normalized_views)",
                DeprecationWarning,
                stacklevel=2,
            )
            assert isinstance(result, (list, tuple))  # checked against _RETURN_TYPE above
            result = Augmentations(result)
        return result

    def build(
        self, config: RunConfig, run: RunContext, backbone: nn.Module, feature_dim: int
    ) -> Components:
        """Build every component of a run and check that they fit together.

        The components are returned, never stored in ``run``: the engine, which owns the run's
        state, sets ``run.backbone`` and ``run.components`` before (``resolve``) and
        ``run.parts`` after. Raises ``PluginError`` for an unknown plugin or one that does not
        provide a component asked of it, and ``ComponentMismatchError`` for components that
        cannot work together.
        """
        sources = self.resolve(config)

        def make(component: str, **kwargs: Any) -> Any:
            return self._make(component, config, sources, run=run, **kwargs)

        augmentations = make("augmentation")
        views = make("views", augmentations=augmentations)
        encoder = make("encoder", backbone=backbone, feature_dim=feature_dim)
        target_update = None
        if sources["target_update"] != NO_TARGET:
            target_update = make("target_update", encoder=encoder)
        if target_update is None:
            sources["target_update"] = NO_TARGET
        loss = make("loss", encoder=encoder)
        code = {c: self.origin(n) for c, n in sources.items() if n != NO_TARGET}
        if _HOOK_OF["views"] not in self._hooks_of(sources["views"]):
            code["views"] = f"sslplug.MultiViewGenerator, the default views of {code['views']}"
        parts = Components(augmentations, views, encoder, loss, target_update, sources, code)
        check_compatible(parts, self.capabilities, backbone=f"--backbone {config.model.backbone}")
        return parts

    # lifecycle -----------------------------------------------------------------------------

    def lifecycle(self, disabled: Iterable[str] = (), used: Iterable[str] = ()) -> Lifecycle:
        """The lifecycle hooks, called on every plugin but those in ``disabled``.

        Raises ``ConfigError`` for every name that is not registered, or that supplies one of
        the run's components (``used``), a line each.
        """
        disabled = list(dict.fromkeys(disabled))
        known = self.internal_names() + self.names()
        problems = []
        for name in disabled:
            if name not in known:
                problems.append(
                    f"--disable {name!r}: no plugin of that name.{did_you_mean(name, known)} "
                    f"Registered: {', '.join(known)}"
                )
            elif name in set(used):
                problems.append(
                    f"--disable {name!r}: that plugin supplies a component of this run; choose "
                    f"another plugin for the component instead"
                )
        if problems:
            raise ConfigError(one_message(problems, "plugins to disable"))
        taking_part = [
            name
            for name in self.names()
            if name not in disabled
            and any(
                caller.name in LIFECYCLE_HOOKS
                for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []
            )
        ]
        return Lifecycle(self.pm, [self.pm.get_plugin(name) for name in disabled], taking_part)
