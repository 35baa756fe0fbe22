"""``sslplug new-plugin``: a ready-to-install package for a new method or a single component.

The package works as written (each component is a small working example built from the public
API), so ``pip install -e`` and ``sslplug list`` show it at once and its test passes before the
author changes a line; the author then replaces the bodies of the hooks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import keyword
import re
from pathlib import Path

from sslplug.config import COMPONENTS
from sslplug.errors import ConfigError

__all__ = ["HOOK_ORDER", "PART_ORDER", "write_plugin"]

# The shape of a method module (docs/tutorial.md, "The shape of a method module"): every
# built-in method and every module this scaffold writes defines its parts, then its hooks, in
# these orders. A part or hook a module does not need is left out.
PART_ORDER = ("settings", "augmentation", "encoder", "loss", "target_update")
HOOK_ORDER = (
    "sslplug_settings",
    "sslplug_capabilities",
    "sslplug_augmentation",
    "sslplug_views",
    "sslplug_encoder",
    "sslplug_target_update",
    "sslplug_loss",
)

# the parts of each component, as working placeholders
_PARTS = {
    "encoder": '''
class Encoder(sslplug.ProjectorEncoder):
    """The backbone and a projector head: replace with your method's encoder."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings) -> None:
        projector = sslplug.MLP(feature_dim, [feature_dim], settings.projection_dim)
        super().__init__(backbone, feature_dim, projector, settings.projection_dim)
''',
    "loss": '''
def negative_cosine(z1: Tensor, z2: Tensor) -> Tensor:
    """``L = -mean_i cos(z1_i, z2_i)`` over the batch: replace with your method's formula."""
    return -F.cosine_similarity(z1, z2, dim=-1).mean()


class Loss(sslplug.Loss):
    """The loss of the first two views' projections; ``requires`` says what it reads."""

    requires = frozenset({"two_views", "projection"})

    def forward(
        self, outputs: sslplug.Outputs, views: sslplug.Views, target: sslplug.Outputs | None
    ) -> sslplug.LossResult:
        z1, z2 = outputs.projections[:2]
        loss = negative_cosine(z1, z2)
        return sslplug.LossResult(loss, {"cosine": -loss.detach()})
''',
}

_HOOKS = {
    "augmentation": '''
@sslplug.hookimpl
def sslplug_augmentation(settings: Settings, run: sslplug.RunContext) -> sslplug.Augmentations:
    """Two augmentation pipelines from a shared recipe (here SimCLR's), batched on the device;
    the core makes one view of each (``sslplug.MultiViewGenerator``)."""
    return sslplug.simclr_recipe(run.image_size, views=2)
''',
    "views": '''
@sslplug.hookimpl
def sslplug_views(augmentations: sslplug.Augmentations) -> sslplug.ViewGenerator:
    """One augmented view per pipeline of the run's augmentation."""
    return sslplug.MultiViewGenerator(augmentations)
''',
    "encoder": '''
@sslplug.hookimpl
def sslplug_encoder(settings: Settings, backbone: nn.Module, feature_dim: int) -> sslplug.Encoder:
    return Encoder(backbone, feature_dim, settings)
''',
    "target_update": '''
@sslplug.hookimpl
def sslplug_target_update(settings: Settings) -> sslplug.TargetUpdate | None:
    """No target network; return a ``sslplug.TargetUpdate`` to have one (see BYOL's)."""
    return None
''',
    "loss": '''
@sslplug.hookimpl
def sslplug_loss(settings: Settings) -> sslplug.Loss:
    return Loss()
''',
}

_MODULE = '''"""{title}: an sslplug plugin providing {provides}.

The method: Author et al. YEAR, "Title of the paper", arXiv:NNNN.NNNNN. Its loss, as the paper
writes it (Section N, eq. N); here the placeholder's::

    L = -mean_i cos(z1_i, z2_i)

Usage::

    {usage}

The parts come in the order of sslplug's built-in methods: settings (the published recipe,
cited), augmentation, encoder, loss (the formula as a function, then the ``Loss`` module) and
target update, then the hooks. Replace the placeholders with your method's; ``docs/hooks.md``
of sslplug describes every hook, its arguments and what it must return.
"""

from __future__ import annotations

import attrs
{torch_imports}
import sslplug


@attrs.define
class Settings:
    """The plugin's settings, with their defaults (your method's published recipe, cited):
    ``--set {name}.projection_dim=64``."""

    projection_dim: int = attrs.field(default=128, validator=sslplug.positive)
{parts}

@sslplug.hookimpl
def sslplug_settings() -> type:
    return Settings
{hooks}'''

_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "{title}: an sslplug plugin."
requires-python = ">=3.10"
dependencies = ["sslplug"]

[project.optional-dependencies]
test = ["pytest"]

[project.entry-points.sslplug]
{name} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""

_TEST = '''"""The plugin is discovered through its entry point and trains for a step."""

from __future__ import annotations

import json
import subprocess
import sys


def _sslplug(*args):
    return subprocess.run(
        [sys.executable, "-m", "sslplug", *args], capture_output=True, text=True, check=False
    )


def test_the_plugin_is_listed():
    listing = _sslplug("list")
    assert listing.returncode == 0
    assert any(line.split()[0] == "{name}" for line in listing.stdout.splitlines()[1:])


CHOICE = [{choice}]


def test_one_step_with_the_plugin(tmp_path):
    args = ["run", *CHOICE, "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path)]
    for setting in ("train.max_steps_per_epoch=1", "knn.baseline=false", "health.baseline=false",
                    "knn.every=0", "health.every=0", "tensorboard.embedding_samples=0",
                    "train.disable=['progress']"):
        args += ["--set", setting]
    done = _sslplug(*args)
    assert done.returncode == 0, done.stderr
    components = json.loads((tmp_path / "summary.json").read_text())["components"]
    assert {expected}
'''

_README = """# {dist}

{title}: an [sslplug](https://github.com) plugin providing {provides}.

```bash
pip install -e '.[test]'     # sslplug list now shows {name}
{usage}
python -m pytest -q          # it is discovered and trains for a step
```

Edit `{module}.py`: each hook returns one component; the settings class holds its defaults.
"""


def _check_name_is_free(name: str, module: str) -> None:
    """Refuse a plugin name that an installed plugin has, or a module name that an installed
    module has: the new package's entry point or module would be shadowed by it (or shadow it)."""
    taken = importlib.metadata.entry_points(group="sslplug").select(name=name)
    for entry in taken:
        owner = entry.dist.name if entry.dist is not None else "an unknown distribution"
        raise ConfigError(
            f"plugin name {name!r} is taken by the installed plugin from {owner} "
            f"(sslplug list shows them all); choose another name, such as {name + '_loss'!r}"
        )
    if importlib.util.find_spec(module) is not None:
        raise ConfigError(
            f"plugin name {name!r} would make a module {module!r}, and an installed module has "
            f"that name already; choose another plugin name"
        )


def _body(components: list[str]) -> tuple[str, str, str]:
    """The parts, the hooks and the torch imports of a module providing ``components``.

    An augmentation comes with the core's default views (``sslplug.MultiViewGenerator``), so a
    views hook is written only for a plugin that provides views without an augmentation.
    """
    hooked = sorted(
        (c for c in components if not (c == "views" and "augmentation" in components)),
        key=lambda c: HOOK_ORDER.index(f"sslplug_{c}"),
    )
    parts = "".join("\n" + _PARTS[c] for c in components if c in _PARTS)
    hooks = "".join("\n" + _HOOKS[c] for c in hooked)
    imports = []
    if "loss" in components:
        imports.append("import torch.nn.functional as F")
    names = [n for n, c in (("Tensor", "loss"), ("nn", "encoder")) if c in components]
    if names:
        imports.append(f"from torch import {', '.join(names)}")
    return parts, hooks, "".join(line + "\n" for line in imports)


def write_plugin(name: str, components: list[str], parent: Path) -> Path:
    """Write the package of plugin ``name`` under ``parent``; return its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ConfigError(
            f"plugin name {name!r} must be lower case letters, digits and underscores, starting "
            f"with a letter (it is what users type after --plugin)"
        )
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"unknown component {unknown[0]!r}; valid: {', '.join(COMPONENTS)}")
    components = [c for c in COMPONENTS if c in components] or list(COMPONENTS)
    dist, module = f"sslplug-{name.replace('_', '-')}", f"sslplug_{name}"
    _check_name_is_free(name, module)
    folder = parent / dist
    if folder.exists():
        raise ConfigError(f"{str(folder)!r} exists already; choose another name or folder")
    title = name.replace("_", " ").title()
    provides = (
        "every component" if len(components) == len(COMPONENTS) else "its " + ", ".join(components)
    )
    if len(components) == len(COMPONENTS):
        choice, expected = f'"--plugin", "{name}"', f'components["encoder"] == "{name}"'
        usage = f"sslplug run --plugin {name}"
    else:
        flags = ", ".join(f'"--{c.replace("_", "-")}", "{name}"' for c in components)
        choice = f'"--plugin", "simclr", {flags}'
        expected = " and ".join(f'components["{c}"] == "{name}"' for c in components)
        usage = "sslplug run --plugin simclr " + " ".join(
            f"--{c.replace('_', '-')} {name}" for c in components
        )
    parts, hooks, torch_imports = _body(components)
    (folder / "tests").mkdir(parents=True)
    fields = {
        "name": name, "dist": dist, "module": module, "title": title, "provides": provides,
        "choice": choice, "expected": expected, "usage": usage, "parts": parts,
        "hooks": hooks, "torch_imports": torch_imports,
    }  # fmt: skip
    (folder / f"{module}.py").write_text(_MODULE.format(**fields))
    (folder / "pyproject.toml").write_text(_PYPROJECT.format(**fields))
    (folder / "tests" / f"test_{name}.py").write_text(_TEST.format(**fields))
    (folder / "README.md").write_text(_README.format(**fields))
    return folder
