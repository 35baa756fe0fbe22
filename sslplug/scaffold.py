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

__all__ = ["write_plugin"]

_HOOKS = {
    "augmentation": '''
@sslplug.hookimpl
def sslplug_augmentation(settings: Settings, run: sslplug.RunContext) -> sslplug.Augmentations:
    """Two augmentation pipelines, batched on the device (here SimCLR's), and what they
    produce: ``sslplug.Augmentations(pipelines, provides={"normalized_views"})``."""
    return sslplug.simclr_recipe(run.image_size, views=2)
''',
    "views": '''
@sslplug.hookimpl
def sslplug_views(augmentations: tuple[nn.Module, ...]) -> sslplug.ViewGenerator:
    """One augmented view per pipeline."""
    return sslplug.MultiViewGenerator(augmentations)
''',
    "encoder": '''
@sslplug.hookimpl
def sslplug_encoder(settings: Settings, backbone: nn.Module, feature_dim: int) -> sslplug.Encoder:
    """The backbone and a projector head."""
    projector = sslplug.MLP(feature_dim, [feature_dim], settings.projection_dim)
    return sslplug.ProjectorEncoder(backbone, feature_dim, projector, settings.projection_dim)
''',
    "loss": '''
class Loss(sslplug.Loss):
    """Negative cosine similarity of the two views' projections: replace with your loss."""

    requires = frozenset({"two_views", "projection"})

    def forward(
        self, outputs: sslplug.Outputs, views: sslplug.Views, target: sslplug.Outputs | None
    ) -> sslplug.LossResult:
        z1, z2 = outputs.projections[:2]
        loss = -F.cosine_similarity(z1, z2, dim=-1).mean()
        return sslplug.LossResult(loss, {"cosine": -loss.detach()})


@sslplug.hookimpl
def sslplug_loss(settings: Settings) -> nn.Module:
    return Loss()
''',
    "target_update": '''
@sslplug.hookimpl
def sslplug_target_update(settings: Settings) -> sslplug.TargetUpdate | None:
    """No target network; return a ``sslplug.TargetUpdate`` to have one (see BYOL's)."""
    return None
''',
}

_MODULE = '''"""{title}: an sslplug plugin providing {provides}.

Replace the body of each hook with your method's; ``docs/hooks.md`` of sslplug describes every
hook, its arguments and what it must return.
"""

from __future__ import annotations

{imports}import attrs
{torch_import}

import sslplug


@attrs.define
class Settings:
    """The plugin's settings, with their defaults: ``--set {name}.projection_dim=64``."""

    projection_dim: int = 128


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
    for setting in ("train.max_steps_per_epoch=1", "eval.baseline=false", "eval.every=0",
                    "eval.embedding_samples=0", "train.progress=false"):
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
    hooks = "".join("\n" + _HOOKS[c] for c in components)
    loss = "loss" in components
    imports = ""
    torch_import = "import torch.nn.functional as F\nfrom torch import nn" if loss else (
        "from torch import nn"
    )
    (folder / "tests").mkdir(parents=True)
    fields = {
        "name": name, "dist": dist, "module": module, "title": title, "provides": provides,
        "choice": choice, "expected": expected, "usage": usage, "hooks": hooks,
        "imports": imports, "torch_import": torch_import,
    }  # fmt: skip
    (folder / f"{module}.py").write_text(_MODULE.format(**fields))
    (folder / "pyproject.toml").write_text(_PYPROJECT.format(**fields))
    (folder / "tests" / f"test_{name}.py").write_text(_TEST.format(**fields))
    (folder / "README.md").write_text(_README.format(**fields))
    return folder
