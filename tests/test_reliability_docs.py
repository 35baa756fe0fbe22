"""docs/reliability.md names a test for every fault it lists: each named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _named_tests() -> list[tuple[str, str]]:
    """``(file, test)`` for every test the page names: ``file.py::test_x`` names the file, and
    the bare ``test_y`` after it in the same cell belong to that file."""
    named = []
    for line in (ROOT / "docs" / "reliability.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = None
        for file, test in re.findall(r"`(?:(\w+\.py)::)?(test_\w+)", line.split("|")[-2]):
            current = file or current
            if current is not None:
                named.append((current, test))
    return named


def test_every_test_that_docs_reliability_names_exists():
    named = _named_tests()
    assert len(named) > 60  # the page's tables were read
    missing = []
    for file, test in named:
        source = ROOT / "tests" / file
        text = source.read_text() if source.exists() else ""
        pattern = rf"def {test}\(" if not test.endswith("_") else rf"def {test}\w*\("
        if not re.search(pattern, text):
            missing.append(f"{file}::{test}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
