"""The figures the documentation derives agree with the figures they are derived from.

Every "mean +- standard deviation" summary in the docs is recomputed from the rows of the table
it follows (the gain column, or the final accuracy column for "pre-trained"), every gain is its
row's final accuracy less its random initialisation, and each paper is cited with one year
wherever it is cited. A figure copied by hand from one page to another, or a row re-measured
without its summary, drifts otherwise (MoCo v2's spread once read 3.1 on its page and 3.0 in
the benchmarks; CPC v2 was dated 2019 in one place and 2020 in another).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "benchmarks.md", *sorted((ROOT / "docs" / "methods").glob("*.md"))]

# "NAME MEAN +- SD", MEAN optionally with a sign and a percent sign: "MoCo v2 +28.2 +- 3.0",
# "pre-trained 95.5% +- 5.7", "gain +28.2 +- 3.0". NAME is the words just before the figure.
SUMMARY = re.compile(
    r"(?P<name>[A-Za-z][\w`-]*(?: [\w`-]+)*) "
    r"(?P<mean>[+-]?\d+(?:\.\d+)?)%? \+- (?P<sd>\d+(?:\.\d+)?)"
)


@attrs.frozen
class Table:
    """A Markdown table: its header cells and its rows' cells, Markdown emphasis kept."""

    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> int | None:
        return self.header.index(name) if name in self.header else None

    def groups(self) -> dict[str, list[list[str]]]:
        """The rows by the thing they measure: all rows when the first column is the seed (a
        method's own page), else rows grouped by their first cell (the method)."""
        if self.header[0] == "seed":
            return {"": self.rows}
        grouped: dict[str, list[list[str]]] = {}
        for row in self.rows:
            grouped.setdefault(row[0], []).append(row)
        return grouped


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _number(cell: str) -> float:
    """``**+24.7**``, ``74.5%``, ``46.32%`` as a float."""
    return float(cell.replace("*", "").replace("%", "").replace("+", ""))


def _decimals(printed: str) -> int:
    return len(printed.partition(".")[2])


def _agrees(computed: float, printed: str) -> bool:
    """Whether ``computed``, rounded to the decimals ``printed`` shows, is ``printed`` (either
    rounding of an exact half is accepted)."""
    return abs(computed - float(printed)) <= 0.5 * 10 ** -_decimals(printed) + 1e-9


def _blocks(page: Path) -> list[Table | str]:
    """The page as tables and paragraphs (whitespace folded), in order; code blocks left out."""
    blocks: list[Table | str] = []
    lines: list[str] = []
    in_code = False
    for line in [*page.read_text().splitlines(), ""]:
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if line.strip():
            lines.append(line)
            continue
        if lines and all(line.lstrip().startswith("|") for line in lines) and len(lines) > 2:
            blocks.append(Table(_cells(lines[0]), [_cells(row) for row in lines[2:]]))
        elif lines:
            blocks.append(" ".join(line.strip() for line in lines))
        lines = []
    return blocks


def _summarised(table: Table, paragraph: str, name: str) -> list[float]:
    """The values a summary figure named ``name`` is computed from, or an AssertionError that
    says why none could be found."""
    gain = table.column("gain")
    assert gain is not None, f"the table before {paragraph[:60]!r} has no 'gain' column"
    groups = table.groups()
    if name in groups:
        rows, column = groups[name], gain
    else:
        word = name.split()[-1].lower()
        assert word in ("gain", "pre-trained"), (
            f"{name!r} in {paragraph[:60]!r} is neither a row of the table before it "
            f"({sorted(groups)}) nor 'gain' or 'pre-trained'"
        )
        named = [label for label in groups if label in paragraph and len(groups[label]) > 1]
        assert len(named) == 1, (
            f"{paragraph[:60]!r} must name exactly one of the table's groups {sorted(groups)}"
        )
        rows, column = groups[named[0]], gain if word == "gain" else gain - 1
    return [_number(row[column]) for row in rows]


def test_every_mean_and_standard_deviation_is_that_of_the_rows_it_summarises():
    wrong, checked = [], 0
    for page in PAGES:
        table: Table | None = None
        for block in _blocks(page):
            if isinstance(block, Table):
                table = block
                continue
            if "mean +- standard deviation" not in block:
                continue
            figures = list(SUMMARY.finditer(block))
            where = f"{page.relative_to(ROOT)}: {block[:60]!r}"
            assert table is not None and figures, f"{where}: no table before it or no figures"
            for figure in figures:
                values = _summarised(table, block, figure["name"])
                mean, sd = statistics.mean(values), statistics.stdev(values)
                if not (_agrees(mean, figure["mean"]) and _agrees(sd, figure["sd"])):
                    wrong.append(
                        f"{where}: {figure['name']} {figure['mean']} +- {figure['sd']}, "
                        f"the rows {values} give {mean:.3f} +- {sd:.3f}"
                    )
                checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 20, f"only {checked} summary figures found: has the parsing broken?"


def test_every_gain_is_the_final_accuracy_less_the_random_initialisation():
    wrong, checked = [], 0
    for page in PAGES:
        for table in (block for block in _blocks(page) if isinstance(block, Table)):
            gain, start = table.column("gain"), table.column("random init")
            if gain is None or start is None:
                continue
            for row in table.rows:
                final = _number(row[gain - 1]) - _number(row[start])
                if not _agrees(final, row[gain].replace("*", "")):
                    wrong.append(f"{page.relative_to(ROOT)}: {row}: {final:+.2f}, not {row[gain]}")
                checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 50, f"only {checked} rows with a gain found: has the parsing broken?"


def test_cpc_v2_has_one_year_everywhere():
    """Hénaff et al., CPC v2 (arXiv:1905.09272), appeared at ICML 2020."""
    sources = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    sources += [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "sslplug").rglob("*.py")]
    years = {
        f"{path.relative_to(ROOT)}: {year}"
        for path in sources
        for year in re.findall(r"H[ée]naff et al\.,? (\d{4})", path.read_text())
    }
    assert len(years) >= 4, f"CPC v2 is cited in fewer places than expected: {sorted(years)}"
    assert all(year.endswith(": 2020") for year in years), sorted(years)


def _method_citations(page: Path, prefix: str) -> dict[str, str]:
    """``[MoCo v2](PREFIXmethods/moco_v2.md) (Chen, Fan, Girshick & He 2020)`` as
    ``{"moco_v2": "Chen, Fan, Girshick & He 2020"}``."""
    link = re.escape(prefix) + r"methods/(\w+)\.md\) \(([^)]*\d{4})\)"
    return dict(re.findall(r"\]\(" + link, page.read_text()))


def test_the_readme_cites_each_method_as_the_methods_page_does():
    readme = _method_citations(ROOT / "README.md", "docs/")
    methods = _method_citations(ROOT / "docs" / "methods.md", "")
    assert len(methods) >= 15, f"docs/methods.md cites only {sorted(methods)}"
    assert readme == methods
