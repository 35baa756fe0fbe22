"""docs/hooks.md against the code.

Its list of signatures covers ``sslplug.__all__``: every public name leads a bullet, with the
signature ``inspect.signature`` gives (a class with its constructor's arguments, an exception
with its bases, a constant with its type), and ``RunContext``'s bullet describes every field.
The signatures are generated: ``python tests/test_hooks_doc.py`` rewrites the code span that
leads each bullet between the markers in docs/hooks.md, and leaves the prose after it, which is
hand-written, as it is; a test checks that the page holds what the generator writes. The
table of the core's lifecycle plugins names the hooks each implements, and the page quotes the
error a lifecycle plugin that raises produces.

The generator lives here, beside the test that needs it, as the mixing matrix's does
(``python tests/test_mixing_matrix.py``): it is a tool for the docs, not part of the package.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import attrs
import pluggy
import pytest

import sslplug
from sslplug import hookspecs
from sslplug.config import RunConfig, RunContext
from sslplug.errors import PluginError
from sslplug.lifecycle import LIFECYCLE_HOOKS, Lifecycle
from sslplug.plugins import PluginRegistry

ROOT = Path(__file__).resolve().parents[1]
HOOKS_MD = ROOT / "docs" / "hooks.md"

BEGIN = (
    "<!-- signatures: refreshed by `python tests/test_hooks_doc.py`; the prose is hand-written -->"
)
END = "<!-- end of signatures -->"
# the code span that leads a bullet: a signature, or a name
LEAD = re.compile(r"^(?P<bullet>[ \t]*- )`(?P<span>[^`]+)`", re.MULTILINE)
QUALIFIED = re.compile(r"(?P<name>\w+)(?:\.(?P<attr>\w+))?")


class _Text(str):
    """A string that ``inspect`` prints as it is: an annotation, which ``from __future__ import
    annotations`` leaves as a string that would otherwise be printed in quotes."""

    def __repr__(self) -> str:
        return str(self)


def _annotation(annotation: Any) -> Any:
    return _Text(annotation) if isinstance(annotation, str) else annotation


def _signature(function: Any, attrs_class: type | None = None, bound: bool = False) -> str:
    """``inspect.signature`` of `function`, annotations unquoted; an attrs class's factory
    defaults shown as ``Factory(dict)``; without the return of a constructor, or the first
    argument (``self``) of a method read from its class (`bound`)."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())[1 if bound else 0 :]
    defaults = {f.alias: f.default for f in attrs.fields(attrs_class)} if attrs_class else {}
    shown = []
    for parameter in parameters:
        default = parameter.default
        factory = getattr(defaults.get(parameter.name), "factory", None)  # an attrs.Factory
        if factory is not None:
            default = _Text(f"Factory({factory.__name__})")
        shown.append(
            parameter.replace(annotation=_annotation(parameter.annotation), default=default)
        )
    returns = (
        inspect.Signature.empty
        if attrs_class or isinstance(function, type)
        else (_annotation(signature.return_annotation))
    )
    return str(signature.replace(parameters=shown, return_annotation=returns))


def _type_of(value: Any) -> str:
    """The type of a constant as a reader wants it: ``dict[str, str]``, ``str``."""
    if isinstance(value, dict):
        keys = " | ".join(sorted({type(k).__name__ for k in value}))
        values = " | ".join(sorted({type(v).__name__ for v in value.values()}))
        return f"dict[{keys}, {values}]"
    return type(value).__name__


def render(span: str) -> str:
    """The lead span of a bullet as the code says it: `span` names a public name, or a member
    of one (``Views.select(...)``); a member written without parentheses (a property, an
    attribute) is kept as written, once it is known to exist."""
    match = QUALIFIED.match(span)
    if not match or match.group("name") not in sslplug.__all__:
        raise ValueError(f"{span!r} does not start with a name of sslplug.__all__")
    name, attr = match.group("name"), match.group("attr")
    owner = getattr(sslplug, name)
    if attr:
        if not hasattr(owner, attr):
            raise ValueError(f"{span!r}: sslplug.{name} has no attribute {attr!r}")
        if not span.startswith(f"{name}.{attr}("):
            return span
        static = inspect.getattr_static(owner, attr)
        method = getattr(owner, attr)
        bound = not isinstance(static, staticmethod | classmethod | property)
        return f"{name}.{attr}{_signature(method, bound=bound)}"
    if isinstance(owner, type) and issubclass(owner, BaseException):
        return f"{name}({', '.join(base.__name__ for base in owner.__bases__)})"
    if not callable(owner):
        return f"{name}: {_type_of(owner)}"
    shown = _signature(owner, owner if attrs.has(owner) else None)
    if isinstance(owner, type) and shown in ("()", "(*args: Any, **kwargs: Any)"):
        return name  # a base class without arguments of its own (nn.Module's)
    return name + shown


def block(page: str) -> tuple[int, int]:
    """Where the signatures are in the page: the offsets after BEGIN and before END."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"docs/hooks.md lacks the markers {BEGIN!r} ... {END!r}")
    return start + len(BEGIN), end


def generate(page: str) -> str:
    """The page with the lead span of every bullet between the markers rendered afresh."""
    start, end = block(page)

    def fresh(match: re.Match[str]) -> str:
        return f"{match.group('bullet')}`{render(match.group('span'))}`"

    return page[:start] + LEAD.sub(fresh, page[start:end]) + page[end:]


def documented(page: str) -> dict[str, str]:
    """Each lead span between the markers -> the bullet it leads (up to the next bullet)."""
    start, end = block(page)
    text = page[start:end]
    leads = list(LEAD.finditer(text))
    bullets = {}
    for lead, after in zip(leads, [*leads[1:], None], strict=True):
        bullets[lead.group("span")] = text[lead.start() : after.start() if after else len(text)]
    return bullets


def test_every_public_name_leads_a_bullet():
    names = {re.split(r"\W", span, maxsplit=1)[0] for span in documented(HOOKS_MD.read_text())}
    missing = sorted(set(sslplug.__all__) - names)
    assert not missing, (
        f"docs/hooks.md's signature list lacks {missing}: add a bullet '- `NAME`: what it is "
        f"for' for each between the markers, then run `python tests/test_hooks_doc.py` to fill "
        f"in the signatures"
    )


def test_every_lead_names_something_public():
    wrong = []
    for span in documented(HOOKS_MD.read_text()):
        try:
            render(span)
        except ValueError as exc:
            wrong.append(str(exc))
    assert not wrong, f"bullets in docs/hooks.md's signature list that name nothing public: {wrong}"


def test_the_signatures_are_those_of_the_code():
    page = HOOKS_MD.read_text()
    fresh = generate(page)
    stale = [
        f"{old!r} is {new!r}"
        for old, new in zip(documented(page), documented(fresh), strict=True)
        if old != new
    ]
    assert fresh == page, (
        f"docs/hooks.md's signatures differ from the code ({stale}); run `python "
        f"tests/test_hooks_doc.py` to rewrite them"
    )


def test_the_run_context_bullet_describes_every_field():
    bullets = documented(HOOKS_MD.read_text())
    bullet = next(text for span, text in bullets.items() if span.startswith("RunContext("))
    prose = bullet.split("`:", 1)[1]  # after the signature
    described = set(re.findall(r"`(?:run\.)?(\w+)", prose))
    missing = [f.name for f in attrs.fields(sslplug.RunContext) if f.name not in described]
    assert not missing, f"docs/hooks.md's RunContext bullet does not describe {missing}"


def test_render_writes_signatures_as_inspect_gives_them():
    """The generator on names of each kind, against signatures written out by hand."""
    assert (
        render("cosine_tau") == "cosine_tau(tau_base: float, step: int, total_steps: int) -> float"
    )
    assert render("Views(") == (
        "Views(images: tuple[Tensor, ...], targets: dict[str, Tensor] = Factory(dict), "
        "groups: tuple[str, ...] = ())"
    )
    assert render("Views.select()") == "Views.select(groups: Sequence[str] | None) -> Views"
    assert render("Views.batch_size") == "Views.batch_size"
    assert render("ConfigError") == "ConfigError(SslplugError, ValueError)"
    assert render("Loss") == "Loss"
    assert render("__version__") == "__version__: str"
    assert render("CAPABILITIES: dict") == "CAPABILITIES: dict[str, str]"
    with pytest.raises(ValueError, match=r"sslplug\.Views has no attribute 'nothing'"):
        render("Views.nothing")
    with pytest.raises(ValueError, match=r"sslplug\.__all__"):
        render("build_parser()")


def _hooks_implemented(registry: PluginRegistry, name: str) -> set[str]:
    plugin = registry.pm.get_plugin(name)
    return {c.name for c in registry.pm.get_hookcallers(plugin) or []} & LIFECYCLE_HOOKS


def test_the_lifecycle_plugins_table_names_the_hooks_each_implements():
    registry = PluginRegistry()
    rows = re.findall(
        r"^\| `(\w+)` \| [^\n]* \| ([a-z, ]+) \|$",
        HOOKS_MD.read_text().split("## Lifecycle hooks", 1)[1].split("###", 1)[0],
        re.MULTILINE,
    )
    table = {
        name: {f"sslplug_{hook.strip().replace(' ', '_')}" for hook in hooks.split(",")}
        for name, hooks in rows
    }
    code = {name: _hooks_implemented(registry, name) for name in registry.internal_names()}
    assert table == code, f"docs/hooks.md's table of lifecycle plugins: {table}; the code: {code}"


class _Raising:
    @sslplug.hookimpl
    def sslplug_step_end(self) -> None:
        raise ValueError("broken")


def test_the_page_quotes_the_error_of_a_lifecycle_plugin_that_raises():
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(_Raising(), name="NAME")
    with pytest.raises(PluginError) as raised:
        Lifecycle(pm, disabled=[]).step_end(RunContext(RunConfig(), image_size=32), 1, {})
    message = str(raised.value).replace("sslplug_step_end", "sslplug_HOOK")
    message = message.replace("ValueError('broken')", "...")
    assert f"`{message}`" in HOOKS_MD.read_text(), (
        f"docs/hooks.md should quote the error a lifecycle plugin that raises produces: `{message}`"
    )


if __name__ == "__main__":
    page = HOOKS_MD.read_text()
    fresh = generate(page)
    HOOKS_MD.write_text(fresh)
    changed = sum(a != b for a, b in zip(documented(page), documented(fresh), strict=True))
    print(f"docs/hooks.md: {changed} signatures rewritten", file=sys.stderr)
