"""The plugin registry: a typed facade over ``pluggy.PluginManager``.

It registers the core's own lifecycle plugins (TensorBoard, progress bar, kNN monitor, view
grid), then loads plugins from the entry-point group ``sslplug`` (built-in methods are listed
there too), isolates failures (a plugin that fails to import, to register or to declare valid
settings is reported and left out, unless ``strict``), keeps the capability names plugins
register, and calls each component hook on exactly the plugin chosen for it. The rest of the
code calls typed methods here rather than ``pm.hook.x(...)``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pluggy
from torch import nn

from sslplug import hookspecs
from sslplug.components import (
    CAPABILITIES,
    Augmentations,
    Encoder,
    TargetUpdate,
    ViewGenerator,
)
from sslplug.config import COMPONENTS, NO_TARGET, RunConfig, RunContext
from sslplug.errors import ComponentMismatchError, ConfigError, PluginError, SslplugError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Capability",
    "Components",
    "Lifecycle",
    "PluginFailure",
    "PluginInfo",
    "PluginRegistry",
]

ENTRY_POINT_GROUP = "sslplug"
CORE = "sslplug"  # who registers the core's capabilities and lifecycle plugins

_HOOK_OF = {name: f"sslplug_{name}" for name in COMPONENTS}
_LIFECYCLE_HOOKS = frozenset(
    f"sslplug_{hook}" for hook in ("run_start", "step_end", "evaluate", "epoch_end", "run_end")
)

_RETURN_TYPE: dict[str, type | tuple[type, ...]] = {
    "augmentation": (list, tuple),
    "views": ViewGenerator,
    "encoder": Encoder,
    "loss": nn.Module,
    "target_update": TargetUpdate,
}

log = logging.getLogger(__name__)


def _describe(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return "sslplug.Augmentations (or a list or tuple of augmentation modules)"
    return f"a {expected.__module__}.{expected.__qualname__}"


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


@attrs.frozen
class Capability:
    """A capability name, what it promises, and the plugin that registered it."""

    name: str
    description: str
    plugin: str


@attrs.define
class Components:
    """The five components of a run, built, and the plugin that supplied each."""

    augmentations: tuple[nn.Module, ...]
    views: ViewGenerator
    encoder: Encoder
    loss: nn.Module
    target_update: TargetUpdate | None
    sources: dict[str, str]

    def modules(self) -> dict[str, nn.Module | None]:
        """The components whose ``state_dict`` a checkpoint holds, by name."""
        return {
            "views": self.views,
            "encoder": self.encoder,
            "loss": self.loss,
            "target_update": self.target_update,
        }

    def optim_rules(self) -> list[Any]:
        """The optimiser rules the components declared (``sslplug.OptimRules``)."""
        rules = []
        for module in self.modules().values():
            method = getattr(module, "optim_rules", None)
            rule = method() if callable(method) else None
            if rule is not None:
                rules.append(rule)
        return rules


class PluginRegistry:
    """Holds the registered plugins and builds components from them.

    Args:
        strict: raise ``PluginError`` on the first plugin that fails to load, instead of
            reporting it in ``failures`` and carrying on without it.
        internal: register the core's lifecycle plugins (``tensorboard``, ``progress``,
            ``knn``, ``view_grid``) first, as pytest registers its own.
    """

    def __init__(self, strict: bool = False, internal: bool = True) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._distributions: dict[str, tuple[str | None, str | None]] = {}
        self._settings: dict[str, type] = {}
        self._internal: list[str] = []
        self.capabilities: dict[str, Capability] = {
            name: Capability(name, text, CORE) for name, text in CAPABILITIES.items()
        }
        if internal:
            from sslplug.monitors import internal_plugins

            for name, plugin in internal_plugins():
                self.pm.register(plugin, name=name)
                self._internal.append(name)

    # loading -------------------------------------------------------------------------------

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every plugin advertised in the entry-point group."""

        def order(ep: importlib.metadata.EntryPoint) -> tuple[str, bool, str]:
            # a name claimed twice goes to sslplug's own plugin, then to the first distribution
            dist = ep.dist.name if ep.dist is not None else ""
            return ep.name, dist != "sslplug", dist

        for ep in sorted(importlib.metadata.entry_points(group=group), key=order):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in self._internal:
                self._fail(ep.name, dist, "the name is taken by one of sslplug's own plugins")
                continue
            if self.pm.has_plugin(ep.name):
                other = self._distributions[ep.name][0]
                if other == dist:  # the same distribution seen twice on sys.path
                    continue
                self._fail(ep.name, dist, f"the name is already taken by distribution {other!r}")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                self._fail(ep.name, dist, f"import of {ep.value!r} failed: {exc!r}")
                continue
            self.register(plugin, ep.name, distribution=dist, version=version)

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
            settings = _check_settings(self._call_one("sslplug_settings", name, {}))
            capabilities = self._collect_capabilities(name)
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
        hooks = {caller.name for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []}
        return tuple(c for c in COMPONENTS if _HOOK_OF[c] in hooks)

    def info(self) -> list[PluginInfo]:
        return [
            PluginInfo(
                name=name,
                distribution=self._distributions[name][0],
                version=self._distributions[name][1],
                components=self.provides(name),
                has_settings=name in self._settings,
            )
            for name in self.names()
        ]

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

    def _resolve(self, config: RunConfig) -> dict[str, str]:
        """The plugin for each component, checked: installed, and implementing the hook."""
        sources = config.components.resolved()
        for component, name in sources.items():
            if component == "target_update" and name == NO_TARGET:
                continue
            if name not in self._distributions:
                installed = ", ".join(self.names()) or "(none)"
                failed = [f for f in self.failures if f.name == name]
                why = f" It failed to load: {failed[0].error}" if failed else ""
                raise PluginError(
                    f"unknown plugin {name!r} for the {component}.{why} Installed plugins: "
                    f"{installed}"
                )
            if component in self.provides(name):
                continue
            if component == "target_update" and not config.components.target_update:
                sources[component] = NO_TARGET  # the method has no target network
                continue
            offering = [n for n in self.names() if component in self.provides(n)]
            raise PluginError(
                f"plugin {name!r} provides no {component}. Plugins that do: "
                f"{', '.join(offering) or '(none)'}"
            )
        return sources

    def _make(
        self, component: str, config: RunConfig, sources: dict[str, str], **kwargs: Any
    ) -> Any:
        """Call the hook of ``component`` on its plugin and check what comes back."""
        name = sources[component]
        kwargs["settings"] = config.plugins.get(name)
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
        except Exception as exc:
            raise PluginError(f"plugin {name!r} failed to build its {component}: {exc!r}") from exc
        if result is None and component == "target_update":
            return None
        expected = _RETURN_TYPE[component]
        if not isinstance(result, expected):
            raise PluginError(
                f"plugin {name!r} returned {type(result).__name__} from {_HOOK_OF[component]}; "
                f"expected {_describe(expected)}"
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

        Raises ``PluginError`` for an unknown plugin, one that does not provide a component
        asked of it, or a capability nobody registered, and ``ComponentMismatchError`` for
        components that cannot work together.
        """
        sources = self._resolve(config)
        run.components = sources
        run.backbone = backbone

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
        parts = Components(augmentations, views, encoder, loss, target_update, sources)
        check_compatible(parts, self.capabilities, backbone=f"--backbone {config.model.backbone}")
        run.parts = parts
        return parts

    # lifecycle -----------------------------------------------------------------------------

    def lifecycle(self, disabled: Iterable[str] = (), used: Iterable[str] = ()) -> Lifecycle:
        """The lifecycle hooks, called on every plugin but those in ``disabled``.

        Raises ``ConfigError`` for a name that is not registered, or that supplies one of the
        run's components (``used``).
        """
        disabled = list(dict.fromkeys(disabled))
        known = self.internal_names() + self.names()
        for name in disabled:
            if name not in known:
                raise ConfigError(
                    f"--disable {name!r}: no plugin of that name; registered: {', '.join(known)}"
                )
            if name in set(used):
                raise ConfigError(
                    f"--disable {name!r}: that plugin supplies a component of this run; choose "
                    f"another plugin for the component instead"
                )
        taking_part = [
            name
            for name in self.names()
            if name not in disabled
            and any(
                caller.name in _LIFECYCLE_HOOKS
                for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or []
            )
        ]
        return Lifecycle(self.pm, [self.pm.get_plugin(name) for name in disabled], taking_part)


class Lifecycle:
    """The lifecycle hooks of one run, typed, without the plugins the user switched off.

    An exception raised inside a lifecycle plugin becomes a ``PluginError`` that names the
    plugin and the hook; an interruption (``KeyboardInterrupt``) and sslplug's own errors pass
    through unchanged.
    """

    def __init__(
        self, pm: pluggy.PluginManager, disabled: Sequence[Any], plugins: Sequence[str] = ()
    ) -> None:
        # the installed plugins taking part, whose settings a run saves
        self.plugins = tuple(plugins)
        self._callers = {
            hook.removeprefix("sslplug_"): pm.subset_hook_caller(hook, remove_plugins=disabled)
            for hook in _LIFECYCLE_HOOKS
        }

    def _call(self, hook: str, **kwargs: Any) -> Any:
        caller = self._callers[hook]
        try:
            return caller(**kwargs)
        except SslplugError:
            raise
        except Exception as exc:
            codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
            frame, name = exc.__traceback__, "?"
            while frame is not None:
                name = codes.get(frame.tb_frame.f_code, name)
                frame = frame.tb_next
            raise PluginError(
                f"lifecycle plugin {name!r} raised in sslplug_{hook}: {exc!r}; switch it off "
                f"with --disable {name} or fix it"
            ) from exc

    def run_start(self, run: RunContext) -> None:
        self._call("run_start", run=run)

    def step_end(self, run: RunContext, step: int, metrics: dict[str, float]) -> None:
        self._call("step_end", run=run, step=step, metrics=metrics)

    def evaluate(self, run: RunContext, epoch: int) -> dict[str, float]:
        merged: dict[str, float] = {}
        for result in reversed(self._call("evaluate", run=run, epoch=epoch)):
            merged.update(result or {})
        return merged

    def epoch_end(self, run: RunContext, epoch: int, metrics: dict[str, float]) -> None:
        self._call("epoch_end", run=run, epoch=epoch, metrics=metrics)

    def run_end(
        self, run: RunContext, summary: dict[str, Any], error: BaseException | None = None
    ) -> None:
        self._call("run_end", run=run, summary=summary, error=error)


def _check_settings(settings: Any) -> type | None:
    """A plugin's settings class must be an attrs class that builds with its defaults."""
    if settings is None:
        return None
    if not attrs.has(settings):
        raise PluginError(f"sslplug_settings must return an attrs class or None, got {settings!r}")
    try:
        attrs.resolve_types(settings)
        settings()
    except Exception as exc:
        raise PluginError(
            f"its settings class {settings.__qualname__} cannot be built from its defaults "
            f"({exc}); give every field a default"
        ) from None
    return settings


def check_compatible(
    parts: Components, capabilities: dict[str, Capability], backbone: str = "the backbone"
) -> None:
    """Check every component's ``requires`` against what the components before it provide,
    and that every name is a registered capability.

    Order of the data flow: the backbone (``patch_tokens`` for a ViT, under the name
    ``backbone``), augmentation, views, encoder, target update, loss. A component may require
    what any component before it provides.
    """
    sources = parts.sources
    chain: Sequence[tuple[str, Any]] = [
        ("augmentation", parts.augmentations),
        ("views", parts.views),
        ("encoder", parts.encoder),
        ("target_update", parts.target_update),
        ("loss", parts.loss),
    ]
    available: dict[str, str] = {
        cap: backbone for cap in getattr(getattr(parts.encoder, "backbone", None), "provides", ())
    }
    for component, obj in chain:
        if obj is None:
            continue
        requires = set(getattr(obj, "requires", ()))
        provides = set(getattr(obj, "provides", ()))
        unknown = sorted((requires | provides) - set(capabilities))
        if unknown:
            raise PluginError(
                f"the {component} of plugin {sources[component]!r} declares the capability "
                f"{', '.join(map(repr, unknown))}, which no plugin registers; register it with "
                f"the sslplug_capabilities hook. Registered: {', '.join(sorted(capabilities))}"
            )
        missing = sorted(requires - set(available))
        if missing:
            have = ", ".join(f"{cap} (from {available[cap]})" for cap in sorted(available))
            raise ComponentMismatchError(
                f"the {component} from plugin {sources[component]!r} requires "
                f"{', '.join(missing)}, which no component before it provides "
                f"({backbone}, augmentation from {sources['augmentation']!r}, views from "
                f"{sources['views']!r}, encoder from {sources['encoder']!r}, target update from "
                f"{sources['target_update']!r}). Available: {have or '(nothing)'}"
            )
        for cap in provides:
            available[cap] = f"{component} of {sources[component]!r}"
