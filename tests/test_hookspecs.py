"""The hook specifications are the plugin author's reference: each is documented and tested."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from sslplug import hookspecs

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("sslplug_")
)


def test_the_five_component_hooks_the_settings_hook_and_lifecycle_hooks_are_there():
    assert {
        "sslplug_augmentation",
        "sslplug_views",
        "sslplug_encoder",
        "sslplug_loss",
        "sslplug_target_update",
        "sslplug_settings",
        "sslplug_run_start",
        "sslplug_step_end",
        "sslplug_epoch_end",
        "sslplug_run_end",
    } <= set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_hook_has_a_docstring(name):
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc and len(doc) > 60, f"{name} needs a docstring that says when it is called"


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_in_the_reference(name):
    reference = (ROOT / "docs" / "hooks.md").read_text()
    assert re.search(rf"^### `{name}\(", reference, re.MULTILINE), f"docs/hooks.md lacks {name}"


def _test_names() -> set[str]:
    """The name of every test function under tests/ (the frozen plugins in fixtures/ aside)."""
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        if "fixtures" in path.relative_to(ROOT / "tests").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return {name for name in names if name.startswith("test_")}


@pytest.mark.parametrize("name", SPECS)
def test_plugin_hooks_have_tests(name):
    """As datasette does: each hook has a test named ``test_hook_<hook>...``."""
    expected = "test_hook_" + name.removeprefix("sslplug_")
    tests = _test_names()
    assert any(expected in test for test in tests), (
        f"no test under tests/ is named {expected}...; add one that exercises {name}"
    )


def test_component_hooks_are_firstresult_and_lifecycle_hooks_are_not():
    for name in SPECS:
        opts = getattr(hookspecs, name).sslplug_spec
        expected = name in {
            "sslplug_augmentation",
            "sslplug_views",
            "sslplug_encoder",
            "sslplug_loss",
            "sslplug_target_update",
        }
        assert opts["firstresult"] is expected, name


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").glob("*.py")), ids=lambda p: p.name)
def test_builtin_plugins_use_only_the_public_api(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sslplug."):
            pytest.fail(f"{path.name} imports {node.module}; use names exported by sslplug")
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("sslplug."), f"{path.name} imports {alias.name}"
