"""Every list of the built-in methods and of the core's lifecycle plugins, in README.md, docs/,
``sslplug run --help`` and the core's docstrings, names what ``sslplug list`` reports.

A list is found by what it names, not by where it is, so a list written tomorrow is checked too:

- the lifecycle plugins (``tensorboard``, ``progress``, ...) are named as code (a code span, a
  code block, a docstring's literal, the help text), and a passage that names three or more of
  them, or a table column of them, is a list of them;
- the methods are named by plugin name (``barlow_twins``): a run of five or more plugin names
  with nothing but commas, "and", "or", spaces, backticks or table bars between them, or a
  table column of them, is a list of them, unless it ends in an ellipsis
  (``simclr, moco_v2, ...``), which says it is a sample;
- the methods are named by their papers' names too (Barlow Twins), which the table of
  docs/methods.md pairs with the plugin names; a passage naming twelve or more is a list.

A passage that names several on purpose without naming all (a measurement of seven methods, the
history of a bug) is in ``PARTIAL`` with its reason; an entry that no longer matches a passage
fails, so an exemption cannot outlive the text it excuses.

The list of pages is checked too: docs/index.md and mkdocs.yml's nav lead to every page.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sslplug.commands import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# a passage naming this many is a list of them
LIFECYCLE_LIST = 3
METHOD_RUN = 5
PAPER_LIST = 12

# (file, a phrase of the passage): passages that name several on purpose, and why
PARTIAL = {
    ("docs/reliability.md", "the error used to blame the `health`"): "the history of a bug",
    ("docs/benchmarks.md", "# likewise moco_v3"): "the seven methods of one measurement",
    ("docs/benchmarks.md", "# likewise moco_v2"): "the seven methods of one measurement",
    ("docs/health.md", "--methods byol simclr"): "a study run in two parts, by backbone",
    ("sslplug/config.py", "monitors (``knn``"): "the monitors that have settings",
}

CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# what may stand between two names of one list
SEPARATOR = re.compile(r"[\s,;|`'\"*#]*(?:\b(?:and|or)\b[\s,;|`'\"*]*)?")
ELLIPSIS = re.compile(r"[\s,;`]*(?:\.\.\.|…)")


@attrs.frozen
class Passage:
    """Text read as one: a paragraph, a list item, a table row, a line of a code block (with the
    lines a trailing comma continues), a paragraph of a docstring, a help text."""

    where: str
    text: str
    code: tuple[tuple[int, int], ...]  # the (start, end) of every stretch of code in `text`

    def in_code(self, start: int) -> bool:
        return any(a <= start < b for a, b in self.code)

    def prose(self) -> str:
        """The text outside code, code blanked out."""
        chars = list(self.text)
        for a, b in self.code:
            chars[a:b] = " " * (b - a)
        return "".join(chars)

    def named(self, names: list[str]) -> list[tuple[int, int, str]]:
        """Where each of `names` is written as code: (start, end, name), in order."""
        pattern = re.compile(
            r"(?<![\w/.-])(" + "|".join(map(re.escape, names)) + r")(?![\w/-]|\.\w)"
        )
        return [
            (m.start(), m.end(), m.group(1))
            for m in pattern.finditer(self.text)
            if self.in_code(m.start())
        ]


def _prose_passage(where: str, lines: list[str]) -> Passage:
    text = "\n".join(lines)
    return Passage(where, text, tuple(m.span(2) for m in CODE_SPAN.finditer(text)))


def _code_passage(where: str, lines: list[str]) -> Passage:
    text = "\n".join(lines)
    return Passage(where, text, ((0, len(text)),))


def markdown_passages(path: Path, root: Path = ROOT) -> Iterator[Passage]:
    """The passages of a Markdown page; a table also gives one passage per column that names
    plugins."""
    name = str(path.relative_to(root))
    lines = path.read_text().splitlines()
    held: list[str] = []
    start = 0
    fenced = False
    table: list[list[str]] = []
    for number, line in enumerate(lines, start=1):
        where = f"{name}:{start}"
        stripped = line.strip()
        if stripped.startswith("```"):
            if held:
                yield (_code_passage if fenced else _prose_passage)(where, held)
            held, start, fenced = [], 0, not fenced
            continue
        if fenced:
            if held and not held[-1].rstrip().endswith((",", "\\")):
                yield _code_passage(where, held)
                held, start = [], 0
            held.append(line)
            start = start or number
            continue
        is_row = stripped.startswith("|")
        new_item = re.match(r"\s*([-*+]|\d+\.)\s|#", line) or not stripped or is_row
        if held and new_item:
            yield _prose_passage(where, held)
            held, start = [], 0
        if is_row:
            cells = re.split(r"(?<!\\)\|", stripped.strip("|"))
            yield _cells_passage(f"{name}:{number}", cells)
            table.append(cells)
            continue
        if table:
            yield from _columns(f"{name}:{number - len(table)}", table)
            table = []
        if stripped and not stripped.startswith("<!--"):
            held.append(line)
            start = start or number
    if held:
        yield (_code_passage if fenced else _prose_passage)(f"{name}:{start}", held)
    if table:
        yield from _columns(f"{name}:{len(lines) - len(table) + 1}", table)


def _cells_passage(where: str, cells: list[str]) -> Passage:
    """Table cells read as one passage; a cell that is a bare name counts as code."""
    marked = [
        f"`{cell.strip()}`" if re.fullmatch(r"\w+", cell.strip()) else cell.strip()
        for cell in cells
    ]
    return _prose_passage(where, [" | ".join(marked)])


def _columns(where: str, rows: list[list[str]]) -> Iterator[Passage]:
    """The columns of a table that names plugins (its header says "plugin" or "name"), each
    read as a list; a column of measurements by method is not a list of the methods."""
    for column, header in enumerate(rows[0]):
        if "plugin" in header or header.strip() == "name":
            cells = [row[column] for row in rows[2:] if column < len(row)]
            yield _cells_passage(f"{where} (column {column + 1})", cells)


def docstring_passages() -> Iterator[Passage]:
    """Every paragraph of every docstring of the core (``sslplug/``)."""
    for path in sorted((ROOT / "sslplug").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            line = getattr(node, "lineno", 1)
            for paragraph in re.split(r"\n\s*\n", doc):
                yield _prose_passage(f"{path.relative_to(ROOT)}:{line}", paragraph.splitlines())


def disable_help() -> str:
    """The help text of ``sslplug run --disable``."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(subparsers.choices, dict)
    run = subparsers.choices["run"]
    return next(a.help for a in run._actions if a.dest == "disable") or ""


def all_passages() -> list[Passage]:
    passages = [p for page in PAGES for p in markdown_passages(page)]
    passages += list(docstring_passages())
    passages.append(_code_passage("sslplug run --help: --disable", [disable_help()]))
    return passages


@attrs.frozen
class Listed:
    """What ``sslplug list`` reports: the built-in methods and the core's lifecycle plugins."""

    methods: list[str]
    lifecycle: list[str]


def sslplug_list() -> Listed:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list"]) == 0
    text = out.getvalue()
    methods = re.findall(r"^(\w+)\s.*\ssslplug_methods\.\1$", text, re.MULTILINE)
    lifecycle = re.search(r"^core lifecycle plugins .*: (.+)$", text, re.MULTILINE)
    assert lifecycle, f"`sslplug list` names no core lifecycle plugins:\n{text}"
    return Listed(methods, lifecycle.group(1).split(", "))


def papers_names(methods: list[str]) -> dict[str, str]:
    """The papers' name of every method, from docs/methods.md's table: name -> plugin name."""
    table = (ROOT / "docs" / "methods.md").read_text()
    rows = re.findall(
        r"^\|[^|\n]*\| \[([^\]]+)\]\(methods/(\w+)\.md\)[^|\n]*\| `(\w+)` \|", table, re.M
    )
    names = {paper: plugin for paper, page, plugin in rows if page == plugin}
    assert sorted(names.values()) == sorted(methods), (
        f"docs/methods.md's table pairs these papers' names with plugin names: {names}; "
        f"`sslplug list` has {methods}"
    )
    return names


def _partial(passage: Passage) -> bool:
    return any(
        passage.where.startswith(f"{page}:") and phrase in passage.text for page, phrase in PARTIAL
    )


def _runs(passage: Passage, names: list[str]) -> Iterator[tuple[list[str], bool]]:
    """The runs of `names` that only separators join, each with whether an ellipsis ends it
    (a sample of the names, not a list of them all)."""
    run: list[tuple[int, int, str]] = []
    for hit in [*passage.named(names), None]:
        if run and (hit is None or not SEPARATOR.fullmatch(passage.text[run[-1][1] : hit[0]])):
            yield [name for _, _, name in run], bool(ELLIPSIS.match(passage.text, run[-1][1]))
            run = []
        if hit is not None:
            run.append(hit)


def lifecycle_lists_short(passages: list[Passage], lifecycle: list[str]) -> list[str]:
    """The passages that name three or more lifecycle plugins, and not all."""
    wrong = []
    for passage in passages:
        named = {name for _, _, name in passage.named(lifecycle)}
        if LIFECYCLE_LIST <= len(named) < len(set(lifecycle)) and not _partial(passage):
            wrong.append(f"{passage.where} lacks {sorted(set(lifecycle) - named)}")
    return wrong


def method_lists_short(passages: list[Passage], methods: list[str]) -> list[str]:
    """The runs of five or more plugin names that are neither every method nor a sample."""
    wrong = []
    for passage in passages:
        for run, sampled in _runs(passage, methods):
            short = METHOD_RUN <= len(set(run)) < len(set(methods))
            if short and not sampled and not _partial(passage):
                wrong.append(f"{passage.where} lacks {sorted(set(methods) - set(run))}")
    return wrong


def paper_lists_short(passages: list[Passage], papers: dict[str, str]) -> list[str]:
    """The passages whose prose names twelve or more methods by their papers' names, not all."""
    wrong = []
    for passage in passages:
        prose = passage.prose()
        named = {
            name
            for name in papers
            if re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", prose)
        }
        if PAPER_LIST <= len(named) < len(papers) and not _partial(passage):
            wrong.append(f"{passage.where} lacks {sorted(set(papers) - named)}")
    return wrong


@pytest.fixture(scope="module")
def listed() -> Listed:
    return sslplug_list()


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    return all_passages()


def test_sslplug_list_names_the_eighteen_methods_and_five_lifecycle_plugins(listed):
    assert len(listed.methods) == 18, listed.methods
    assert listed.lifecycle == ["tensorboard", "progress", "knn", "health", "view_grid"]


def test_every_list_of_lifecycle_plugins_names_them_all(listed, passages):
    wrong = lifecycle_lists_short(passages, listed.lifecycle)
    assert not wrong, f"lists of the core's lifecycle plugins that leave some out: {wrong}"


def test_every_list_of_plugin_names_names_every_method(listed, passages):
    wrong = method_lists_short(passages, listed.methods)
    assert not wrong, f"lists of the built-in methods that leave some out: {wrong}"


def test_every_list_of_papers_names_names_every_method(listed, passages):
    wrong = paper_lists_short(passages, papers_names(listed.methods))
    assert not wrong, f"lists of the methods by paper that leave some out: {wrong}"


def test_every_exemption_still_excuses_a_passage(passages):
    stale = [
        (page, phrase)
        for page, phrase in PARTIAL
        if not any(p.where.startswith(f"{page}:") and phrase in p.text for p in passages)
    ]
    assert not stale, f"PARTIAL entries that match no passage any more (remove them): {stale}"


def test_the_finder_catches_each_kind_of_list_that_leaves_one_out(listed, tmp_path):
    """A page with every kind of list, each short of its last name, and the same lists whole
    or marked as samples: only the short ones are reported, each once."""
    methods, lifecycle = listed.methods, listed.lifecycle
    papers = papers_names(methods)

    def as_code(names: list[str]) -> str:
        return ", ".join(f"`{name}`" for name in names)

    def pages(short: int) -> str:
        few_methods, few_lifecycle = methods[: len(methods) - short], lifecycle[: 5 - short]
        rows = "\n".join(f"| `{name}` | a monitor |" for name in few_lifecycle)
        return "\n\n".join(
            [
                f"Other methods: `--plugin {few_methods[0]}`, {as_code(few_methods[1:])}.",
                f"```bash\nsslplug run --plugin {few_methods[0]}   # or "
                f"{', '.join(few_methods[1:4])},\n    {', '.join(few_methods[4:])}\n```",
                f"The monitors are plugins ({as_code(few_lifecycle)}).",
                f"| name | what it does |\n|---|---|\n{rows}",
                "Methods: " + ", ".join(list(papers)[: len(papers) - short]) + ".",
            ]
        )

    short_page, whole_page = tmp_path / "short.md", tmp_path / "whole.md"
    short_page.write_text(pages(1))
    whole_page.write_text(pages(0) + f"\n\n`sslplug run --plugin` {as_code(methods[:6])}, ...")
    found = {}
    for page in (short_page, whole_page):
        read = list(markdown_passages(page, tmp_path))
        found[page.name] = [
            *lifecycle_lists_short(read, lifecycle),
            *method_lists_short(read, methods),
            *paper_lists_short(read, papers),
        ]
    assert found["whole.md"] == []
    assert [where.split(" lacks ")[0] for where in found["short.md"]] == [
        "short.md:8",
        "short.md:10 (column 1)",
        "short.md:1",
        "short.md:4",
        "short.md:17",
    ], found["short.md"]


def _nav_pages(entries: object) -> Iterator[str]:
    """The pages of mkdocs.yml's nav, at any depth."""
    if isinstance(entries, str):
        yield entries
    elif isinstance(entries, list):
        for entry in entries:
            yield from _nav_pages(entry)
    elif isinstance(entries, dict):
        for value in entries.values():
            yield from _nav_pages(value)


def test_every_page_is_linked_from_the_index_and_in_the_nav():
    """A page that the index or the site's navigation leaves out is a page nobody finds: every
    top-level page of docs/ is linked from docs/index.md, every method page from
    docs/methods.md, and all of them are in mkdocs.yml's nav."""
    yaml = pytest.importorskip("yaml")
    nav = set(_nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    docs = ROOT / "docs"
    top = sorted(p.name for p in docs.glob("*.md") if p.name != "index.md")
    methods = sorted(f"methods/{p.name}" for p in (docs / "methods").glob("*.md"))
    linked_from_index = set(re.findall(r"\]\(([\w/.-]+\.md)\)", (docs / "index.md").read_text()))
    linked_from_methods = set(
        re.findall(r"\]\(([\w/.-]+\.md)\)", (docs / "methods.md").read_text())
    )
    assert [page for page in top if page not in linked_from_index] == []
    assert [page for page in methods if page not in linked_from_methods] == []
    assert [page for page in ["index.md", *top, *methods] if page not in nav] == []
