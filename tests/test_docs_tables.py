"""Every Markdown table in README.md and docs/ renders: its delimiter row has as many cells as
its header (GitHub and the documentation site show a table whose rows disagree as plain text,
and `mkdocs build --strict` does not catch it)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cells(row: str) -> int:
    return len(re.sub(r"\\\|", "", row.strip()).strip("|").split("|"))


def test_every_table_delimiter_row_has_as_many_cells_as_its_header():
    wrong = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines = page.read_text().splitlines()
        for number, (header, delimiter) in enumerate(itertools.pairwise(lines), start=1):
            if not re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", delimiter):
                continue
            if header.strip().startswith("|") and _cells(header) != _cells(delimiter):
                wrong.append(f"{page.relative_to(ROOT)}:{number}")
    assert not wrong, f"tables whose delimiter row and header differ in cells: {wrong}"
