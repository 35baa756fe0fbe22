"""``sslplug new-plugin``: write a ready-to-install package for a new method or component."""

from __future__ import annotations

import argparse
from pathlib import Path

from sslplug.config import COMPONENTS
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "write a ready-to-install package for a new method or component"
DESCRIPTION = (
    "Write sslplug-NAME/: pyproject.toml with the entry point, sslplug_NAME.py with "
    "working hook implementations to replace, a test, a README. `pip install -e` it "
    "and `sslplug list` shows it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "--component",
        action="append",
        default=[],
        choices=COMPONENTS,
        help="a component the plugin provides (repeatable; default: all five)",
    )
    parser.add_argument(
        "--dir", type=Path, default=Path("."), help="where to write it (default .)"
    )


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    """Write the package; the registry is not needed (``main`` loads it for every command)."""
    from sslplug.scaffold import write_plugin

    folder = write_plugin(args.name, args.component, args.dir)
    print(f"wrote {folder}/; next: pip install -e '{folder}[test]' && sslplug list")
    return 0
