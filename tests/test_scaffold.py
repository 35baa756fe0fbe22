"""``sslplug new-plugin`` writes a package that installs, is listed, and passes its own test,
and its module has the shape of every built-in method's (docs/tutorial.md)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
from types import ModuleType

import pytest
import sslplug_methods
import torch

import sslplug
from sslplug.cli import main
from sslplug.config import RunContext, load_config
from sslplug.nn import SmallConvNet
from sslplug.scaffold import HOOK_ORDER, PART_ORDER, write_plugin

from .conftest import ThrowawayVenv


@pytest.mark.slow  # a pip install and two subprocesses
def test_new_plugin_installs_lists_and_passes_its_own_test(
    plugin_venv: ThrowawayVenv, tmp_path, capsys
):
    assert main(["new-plugin", "cosine_loss", "--component", "loss", "--dir", str(tmp_path)]) == 0
    folder = tmp_path / "sslplug-cosine-loss"
    assert {p.name for p in folder.iterdir()} == {
        "pyproject.toml", "sslplug_cosine_loss.py", "tests", "README.md",
    }  # fmt: skip
    with plugin_venv.installed(folder, editable=True) as (installed,):
        assert ("cosine_loss", "sslplug-cosine-loss") in plugin_venv.entry_points()
        listing = plugin_venv.sslplug("list")
        assert listing.returncode == 0, listing.stderr[-2000:]
        row = next(line.split() for line in listing.stdout.splitlines() if "cosine_loss" in line)
        assert row[1:3] == ["sslplug-cosine-loss", "0.1.0"]
        assert row[3:8] == ["-", "-", "-", "x", "-"]
        own = plugin_venv.run(
            "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=installed
        )
        assert own.returncode == 0, own.stdout[-3000:]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["new-plugin", "My-Loss"], "plugin name 'My-Loss' must be lower case"),
        (["new-plugin", "class"], "plugin name 'class' must be lower case"),
        (["new-plugin", "vicreg"], "name 'vicreg' is taken by the installed plugin from sslplug"),
    ],
)
def test_bad_plugin_names_are_refused(args, pattern, tmp_path, capsys):
    assert main([*args, "--dir", str(tmp_path)]) == 2
    assert pattern in capsys.readouterr().err


def test_an_existing_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "sslplug-mine").mkdir()
    assert main(["new-plugin", "mine", "--dir", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_a_name_whose_module_exists_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "sslplug_shadowed.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["new-plugin", "shadowed", "--dir", str(tmp_path)]) == 2
    assert "would make a module 'sslplug_shadowed', and an installed module" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "sslplug-shadowed").exists()


# the shape of a method module ----------------------------------------------------------------


def _line(obj: object) -> int:
    return inspect.getsourcelines(obj)[1]  # type: ignore[arg-type]


def _own_classes(module: ModuleType, base: type) -> dict[str, type]:
    return {
        name: c
        for name, c in vars(module).items()
        if inspect.isclass(c) and issubclass(c, base) and c.__module__ == module.__name__
    }


def _assert_shape(module: ModuleType) -> None:
    """Parts in ``PART_ORDER``, then the hooks in ``HOOK_ORDER``; the encoder a class."""
    hooks = [h for h in HOOK_ORDER if hasattr(module, h)]
    lines = [_line(getattr(module, h)) for h in hooks]
    assert lines == sorted(lines), f"{module.__name__}: hooks in the order {hooks}"
    bases = {
        "augmentation": sslplug.ViewGenerator,
        "encoder": sslplug.Encoder,
        "loss": sslplug.Loss,
        "target_update": sslplug.TargetUpdate,
    }
    parts = {"settings": [_line(module.sslplug_settings())]}
    for part, base in bases.items():
        parts[part] = [_line(c) for c in _own_classes(module, base).values()]
    present = [p for p in PART_ORDER if parts[p]]
    for earlier, later in itertools.pairwise(present):
        assert max(parts[earlier]) < min(parts[later]), (
            f"{module.__name__}: its {earlier} comes after its {later}"
        )
    assert max(max(parts[p]) for p in present) < min(lines), (
        f"{module.__name__}: a part after the first hook"
    )
    assert parts["encoder"], f"{module.__name__}: its encoder is a class of its own"


@pytest.mark.parametrize("method", sslplug_methods.METHODS)
def test_every_built_in_method_has_the_shape(method: str) -> None:
    module = importlib.import_module(f"sslplug_methods.{method}")
    _assert_shape(module)
    encoders = list(_own_classes(module, sslplug.Encoder))
    assert all(name.endswith("Encoder") for name in encoders), encoders
    if hasattr(module, "sslplug_views"):  # only views of its own: the default is the core's
        source = inspect.getsource(module.sslplug_views)
        assert "return sslplug.MultiViewGenerator(augmentations)" not in source


def _written(tmp_path, monkeypatch, name: str, components: list[str]) -> ModuleType:
    """The module ``write_plugin`` writes for ``components``, imported."""
    folder = write_plugin(name, components, tmp_path)
    spec = importlib.util.spec_from_file_location(f"sslplug_{name}", folder / f"sslplug_{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module.__name__, module)  # for inspect to find its source
    spec.loader.exec_module(module)
    return module


def test_the_scaffold_writes_the_shape_of_a_method_module_and_it_trains(tmp_path, monkeypatch):
    module = _written(tmp_path, monkeypatch, "shaped", [])
    _assert_shape(module)
    assert not hasattr(module, "sslplug_views")  # an augmentation comes with the default views
    docstring = inspect.getdoc(module) or ""
    assert "arXiv:" in docstring and "Usage::" in docstring
    settings = module.Settings()
    run = RunContext(config=load_config(), image_size=16)
    views = sslplug.MultiViewGenerator(module.sslplug_augmentation(settings, run))(
        torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    )
    backbone = SmallConvNet(width=4)
    encoder = module.sslplug_encoder(settings, backbone, backbone.out_dim)
    assert module.sslplug_target_update(settings) is None
    loss, metrics = module.sslplug_loss(settings)(encoder(views), views, None)
    assert torch.isfinite(loss) and set(metrics) == {"cosine"}


def test_the_scaffold_writes_a_views_hook_only_without_an_augmentation(tmp_path, monkeypatch):
    assert hasattr(_written(tmp_path, monkeypatch, "views_only", ["views"]), "sslplug_views")
    both = _written(tmp_path, monkeypatch, "both", ["augmentation", "views"])
    assert not hasattr(both, "sslplug_views")
