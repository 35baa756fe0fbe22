"""The plugin registry: a typed facade over ``pluggy.PluginManager``.

It loads plugins from the entry-point group ``sslplug`` (built-ins are listed there too),
isolates failures (a plugin that fails to import or validate is reported and left out, unless
``strict``), and calls each component hook on exactly the plugin chosen for it. The rest of the
code calls typed methods here rather than ``pm.hook.x(...)``.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from typing import Any

import attrs
import pluggy
from torch import nn

from sslplug import hookspecs
from sslplug.components import Encoder, TargetUpdate, ViewGenerator
from sslplug.config import COMPONENTS, RunConfig, RunContext
from sslplug.errors import ComponentMismatchError, PluginError

__all__ = ["ENTRY_POINT_GROUP", "Components", "PluginFailure", "PluginInfo", "PluginRegistry"]

ENTRY_POINT_GROUP = "sslplug"
NO_TARGET = "none"

_HOOK_OF = {name: f"sslplug_{name}" for name in COMPONENTS}

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
        return "a list or tuple of augmentation modules, one per view"
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


@attrs.define
class Components:
    """The five components of a run, built, and the plugin that supplied each."""

    augmentations: tuple[nn.Module, ...]
    views: ViewGenerator
    encoder: Encoder
    loss: nn.Module
    target_update: TargetUpdate | None
    sources: dict[str, str]


class PluginRegistry:
    """Holds the registered plugins and builds components from them.

    Args:
        strict: raise ``PluginError`` on the first plugin that fails to load, instead of
            reporting it in ``failures`` and carrying on without it.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._distributions: dict[str, tuple[str | None, str | None]] = {}
        self._settings: dict[str, type] = {}

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
            settings = self._call_one("sslplug_settings", name, {})
            if settings is not None and not attrs.has(settings):
                raise PluginError(
                    f"sslplug_settings must return an attrs class or None, got {settings!r}"
                )
        except Exception as exc:
            self.pm.unregister(name=name)
            self._fail(name, distribution, str(exc))
            return False
        if settings is not None:
            self._settings[name] = settings
        self._distributions[name] = (distribution, version)
        return True

    def _fail(self, name: str, distribution: str | None, error: str) -> None:
        failure = PluginFailure(name, distribution, error)
        if self.strict:
            raise PluginError(str(failure))
        log.warning("%s", failure)
        self.failures.append(failure)

    # queries -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin() if name in self._distributions)

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

    # building ------------------------------------------------------------------------------

    def _require_plugin(self, name: str, component: str) -> None:
        if name not in self._distributions:
            installed = ", ".join(self.names()) or "(none)"
            failed = [f for f in self.failures if f.name == name]
            why = f" It failed to load: {failed[0].error}" if failed else ""
            raise PluginError(
                f"unknown plugin {name!r} for the {component}.{why} Installed plugins: {installed}"
            )

    def _call_one(self, hook: str, name: str, kwargs: dict[str, Any]) -> Any:
        """Call ``hook`` on plugin ``name`` alone; the impl receives the arguments it names."""
        others = [p for n, p in self.pm.list_name_plugin() if n != name]
        caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
        result = caller(**kwargs)
        if isinstance(result, list):  # non-firstresult hooks return a list
            return result[0] if result else None
        return result

    def build(
        self, config: RunConfig, run: RunContext, backbone: nn.Module, feature_dim: int
    ) -> Components:
        """Build every component of a run and check that they fit together.

        Raises ``PluginError`` for an unknown plugin or one that does not provide a component
        asked of it, and ``ComponentMismatchError`` for components that cannot work together.
        """
        sources = config.components.resolved()
        for component, name in sources.items():
            if component == "target_update" and name == NO_TARGET:
                continue
            self._require_plugin(name, component)
            explicit = getattr(config.components, component) != ""
            if component not in self.provides(name) and (explicit or component != "target_update"):
                offering = [n for n in self.names() if component in self.provides(n)]
                raise PluginError(
                    f"plugin {name!r} provides no {component}. Plugins that do: "
                    f"{', '.join(offering) or '(none)'}"
                )
        run.components = dict(sources)

        def settings(component: str) -> Any:
            return config.plugins.get(sources[component])

        def call(component: str, **kwargs: Any) -> Any:
            name = sources[component]
            try:
                result = self._call_one(_HOOK_OF[component], name, kwargs)
            except (PluginError, ComponentMismatchError):
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} failed to build its {component}: {exc!r}"
                ) from exc
            if result is None and component == "target_update":
                return None
            expected = _RETURN_TYPE[component]
            if not isinstance(result, expected):
                raise PluginError(
                    f"plugin {name!r} returned {type(result).__name__} from "
                    f"{_HOOK_OF[component]}; expected {_describe(expected)}"
                )
            return result

        augmentations = tuple(call("augmentation", settings=settings("augmentation"), run=run))
        views = call("views", settings=settings("views"), run=run, augmentations=augmentations)
        encoder = call(
            "encoder",
            settings=settings("encoder"),
            run=run,
            backbone=backbone,
            feature_dim=feature_dim,
        )
        target_update = None
        if sources["target_update"] != NO_TARGET and "target_update" in self.provides(
            sources["target_update"]
        ):
            target_update = call(
                "target_update", settings=settings("target_update"), run=run, encoder=encoder
            )
        if target_update is None:
            sources["target_update"] = NO_TARGET
            run.components["target_update"] = NO_TARGET
        loss = call("loss", settings=settings("loss"), run=run, encoder=encoder)

        check_compatible(sources, views, encoder, loss, target_update)
        return Components(augmentations, views, encoder, loss, target_update, sources)

    # lifecycle -----------------------------------------------------------------------------

    def run_start(self, run: RunContext) -> None:
        self.pm.hook.sslplug_run_start(run=run)

    def step_end(self, run: RunContext, step: int, metrics: dict[str, float]) -> None:
        self.pm.hook.sslplug_step_end(run=run, step=step, metrics=metrics)

    def epoch_end(self, run: RunContext, epoch: int, metrics: dict[str, float]) -> None:
        self.pm.hook.sslplug_epoch_end(run=run, epoch=epoch, metrics=metrics)

    def run_end(self, run: RunContext, summary: dict[str, Any]) -> None:
        self.pm.hook.sslplug_run_end(run=run, summary=summary)


def check_compatible(
    sources: dict[str, str],
    views: ViewGenerator,
    encoder: Encoder,
    loss: nn.Module,
    target_update: TargetUpdate | None,
) -> None:
    """Check every component's ``requires`` against what the components before it provide.

    Order of the data flow: views, then encoder, then target update, then loss. A component may
    require what any component before it provides.
    """
    chain: Sequence[tuple[str, Any]] = [
        ("views", views),
        ("encoder", encoder),
        ("target_update", target_update),
        ("loss", loss),
    ]
    available: dict[str, str] = {}
    for component, obj in chain:
        if obj is None:
            continue
        missing = sorted(set(getattr(obj, "requires", ())) - set(available))
        if missing:
            have = ", ".join(f"{cap} (from {available[cap]})" for cap in sorted(available))
            raise ComponentMismatchError(
                f"the {component} from plugin {sources[component]!r} requires "
                f"{', '.join(missing)}, which no component before it provides "
                f"(views from {sources['views']!r}, encoder from {sources['encoder']!r}, "
                f"target update from {sources['target_update']!r}). "
                f"Available: {have or '(nothing)'}"
            )
        for cap in getattr(obj, "provides", ()):
            available[cap] = f"{component} of {sources[component]!r}"
