"""The README's commands name what exists: an example plugin is chosen by its own entry point."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_chooses_the_example_plugin_by_its_entry_point():
    text = (ROOT / "README.md").read_text()
    shown = r"pip install \./(docs/examples/[\w-]+)`, then\s+`sslplug run ([^`]*)`"
    example = re.search(shown, text)
    assert example, "README.md no longer shows installing an example plugin and running it"
    project = tomllib.loads((ROOT / example.group(1) / "pyproject.toml").read_text())
    names = set(project["project"]["entry-points"]["sslplug"])
    chosen = re.findall(r"--(?:plugin|loss|encoder|views|augmentation) (\S+)", example.group(2))
    assert any(name in names for name in chosen), (
        f"`sslplug run {example.group(2)}` chooses {chosen}; the example registers {sorted(names)}"
    )
