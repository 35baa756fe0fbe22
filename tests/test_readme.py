"""The README as a new user meets it: the quick start makes a virtual environment, then
installs, runs and tests with the commands CI runs; a result and its picture come before the
citations; plugin authors find the scaffold and the tutorial; the commands and links name what
exists (an example plugin is chosen by its own entry point)."""

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


def _quick_start() -> list[str]:
    """The commands of the README's first code block, comments removed."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no bash code block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines()]


def test_the_quick_start_makes_a_virtual_environment_then_installs_runs_and_tests():
    commands = _quick_start()
    venv = "python3 -m venv .venv && . .venv/bin/activate"
    steps = [venv, "pip install -e '.[test]'", "sslplug run --plugin byol", "python -m pytest -q"]
    assert [command for command in commands if command in steps] == steps, (
        f"the quick start should be {steps} in that order (many system Pythons refuse pip "
        f"install outside a virtual environment, PEP 668); it is {commands}"
    )
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert {"pip install -e '.[test]'", "python -m pytest -q"} <= set(ci), (
        ".ci/run no longer runs the README's install and test commands"
    )


def test_a_result_and_its_picture_come_before_the_citations():
    text = (ROOT / "README.md").read_text()
    citation = re.search(r"\b(?:et al\.|& \w+) \d{4}\b", text)
    result = re.search(r"\d+\.\d+%", text)
    picture = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert citation and result and picture, "README.md lacks a citation, a result or a picture"
    assert result.start() < citation.start(), "the first result comes after the citations"
    assert picture.start() < citation.start(), "the first picture comes after the citations"
    assert (ROOT / picture.group(1)).is_file(), f"{picture.group(1)} does not exist"


def test_the_readme_points_plugin_authors_to_the_scaffold_and_the_tutorial():
    text = (ROOT / "README.md").read_text()
    assert "sslplug new-plugin" in text and "](docs/tutorial.md)" in text


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_in_the_readme_leads_somewhere():
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path if path else ROOT / "README.md"
        if not page.exists() or (anchor and anchor not in _anchors(page)):
            broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"
