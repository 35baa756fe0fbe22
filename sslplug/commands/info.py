"""``sslplug info PLUGIN``: one plugin's distribution, components, capabilities, and settings
with their defaults; for one of the core's lifecycle plugins (``knn``, ``health``, ...), what
it does, its settings and how to switch it off."""

from __future__ import annotations

import argparse
import inspect

import attrs

from sslplug import __version__
from sslplug.errors import ConfigError
from sslplug.plugins import PluginRegistry
from sslplug.settings_values import did_you_mean

__all__ = ["HELP", "add_arguments", "run"]

HELP = (
    "one plugin (or one of the core's lifecycle plugins, such as knn): its distribution, "
    "components, and settings with their defaults"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="PLUGIN")


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    if args.name in registry.internal_names():
        _print_lifecycle_plugin(args.name, registry)
        return 0
    entry = next((i for i in registry.info() if i.name == args.name), None)
    if entry is None:
        known = registry.names() + registry.internal_names()
        raise ConfigError(
            f"no plugin named {args.name!r}.{did_you_mean(args.name, known)} Installed: "
            f"{', '.join(registry.names()) or '(none)'}; the core's lifecycle plugins: "
            f"{', '.join(registry.internal_names()) or '(none)'}"
        )
    module = registry.pm.get_plugin(args.name)
    print(f"{entry.name}: from {entry.distribution or '?'} {entry.version or '?'}")
    print(f"code: {entry.module}")
    doc = inspect.getdoc(module)
    if doc:
        print("\n" + doc.split("\n\n")[0])
    print(f"\ncomponents: {', '.join(entry.components) or '(none)'}")
    capabilities = registry.capabilities_of(args.name)
    if capabilities:
        print("capabilities it registers:")
        for capability in capabilities:
            print(f"  {capability.name}: {capability.description}")
    _print_settings(args.name, registry)
    return 0


def _print_lifecycle_plugin(name: str, registry: PluginRegistry) -> None:
    """One of the core's lifecycle plugins: the first paragraph of its module's docstring (what
    it does), the hooks it implements, its settings, and how to switch it off."""
    plugin = registry.pm.get_plugin(name)
    print(f"{name}: a lifecycle plugin of the core (sslplug {__version__}), on in every run")
    print(f"code: {registry.module_of(name)}")
    doc = inspect.getdoc(inspect.getmodule(plugin))
    if doc:
        print("\n" + doc.split("\n\n")[0])
    hooks = sorted(caller.name for caller in registry.pm.get_hookcallers(plugin) or [])
    print(f"\nhooks: {', '.join(h for h in hooks if h != 'sslplug_settings')}")
    print(f'switch it off: sslplug run --disable {name} (or disable = ["{name}"] under [train])')
    _print_settings(name, registry)


def _print_settings(name: str, registry: PluginRegistry) -> None:
    """The plugin's settings class, each field with its default and type (or that it has
    none)."""
    settings = registry.settings_classes().get(name)
    if settings is None:
        print("settings: none")
        return
    print(f"settings ([{name}] in a TOML file, or --set {name}.KEY=VALUE):")
    settings_doc = inspect.getdoc(settings)
    if settings_doc:
        print("  " + settings_doc.split("\n\n")[0].replace("\n", "\n  "))
    for field in attrs.fields(settings):
        # attrs' stubs declare Factory a function (it pretends to return the value it makes)
        is_factory = isinstance(field.default, attrs.Factory)  # type: ignore[arg-type]
        default = field.default.factory() if is_factory else field.default
        kind = getattr(field.type, "__name__", None) or str(field.type)
        print(f"  {field.name} = {default!r}  ({kind})")
