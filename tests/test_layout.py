"""The map of folders in docs/design.md, held against the code: who may import whom, and how
big a module or a function may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "sslplug"
METHODS = ROOT / "plugins" / "sslplug_methods"

MAX_MODULE_LINES = 520
MAX_FUNCTION_LINES = 60
# argument tables: functions that only declare a command's arguments or a table of names
TABLES = {"add_arguments"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT if path.is_relative_to(CORE) else ROOT / "plugins").parts
    name = ".".join(parts).removesuffix(".py")
    return name.removesuffix(".__init__")


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _core_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _sources(CORE)}


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_built_in_methods_import_only_the_public_api():
    for path in _sources(METHODS):
        core = {n for n in _imports(path) if _under(n, "sslplug")}
        assert core <= {"sslplug"} | {f"sslplug.{n}" for n in _public_names()}, (
            f"{path.name} imports {sorted(core - {'sslplug'})}: a method uses `import sslplug` only"
        )


def _public_names() -> set[str]:
    import sslplug

    return set(sslplug.__all__) | {"hookimpl"}


def test_the_core_names_no_method():
    for name, path in _core_modules().items():
        methods = {n for n in _imports(path) if n.startswith("sslplug_")}
        assert not methods, f"{name} imports {sorted(methods)}: the core never names a plugin"


def test_only_the_entry_points_import_the_commands():
    allowed = {"sslplug.cli", "sslplug.__main__"}
    for name, path in _core_modules().items():
        if _under(name, "sslplug.commands") or name in allowed:
            continue
        assert not {n for n in _imports(path) if _under(n, "sslplug.commands")}, name


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # data sets know nothing of training, plugins, monitors or commands
        ("sslplug.data", ("sslplug.engine", "sslplug.plugins", "sslplug.assembly",
                          "sslplug.monitors", "sslplug.commands", "sslplug.resume")),
        # the core's monitors are plugins: they see the run, not the loop that runs it
        ("sslplug.monitors", ("sslplug.engine", "sslplug.assembly", "sslplug.commands",
                              "sslplug.resume")),
        # the contract (hooks, components, settings) depends on nothing that implements it
        ("sslplug.hookspecs", ("sslplug.engine", "sslplug.plugins", "sslplug.data",
                               "sslplug.monitors", "sslplug.commands")),
        ("sslplug.components", ("sslplug.engine", "sslplug.plugins", "sslplug.data",
                                "sslplug.monitors", "sslplug.commands")),
        ("sslplug.config", ("sslplug.engine", "sslplug.plugins", "sslplug.monitors",
                            "sslplug.commands", "sslplug.assembly")),
    ],
)  # fmt: skip
def test_import_rules_of_the_map(package, forbidden):
    for name, path in _core_modules().items():
        if not _under(name, package):
            continue
        bad = sorted(n for n in _imports(path) if _under(n, *forbidden))
        assert not bad, f"{name} imports {bad}; docs/design.md's map forbids it"


def test_modules_import_each_other_in_no_circle():
    modules = _core_modules()
    imported = {name: _imports(path, top_level_only=True) for name, path in modules.items()}
    graph = {
        name: {target for target in modules if target != name and target in imported[name]}
        for name in modules
    }
    # a package's face imports its own modules; that is no circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circle = trail[trail.index(target) :] if target in trail else trail
                pytest.fail(f"import circle: {' -> '.join([*circle, target])}")
            if target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_of_the_core_outgrows_one_reading():
    big = {
        name: lines
        for name, path in _core_modules().items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}; split them by what they hold"


def test_no_function_of_the_core_is_longer_than_a_screen():
    long = []
    for name, path in _core_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and node.name not in TABLES:
                    long.append(f"{name}.{node.name} ({length})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
