"""Shared fixtures: a loaded registry, a small labelled image folder, settings for fast runs, and a
throwaway virtual environment for tests that install plugin distributions with pip."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from sslplug.data import SHAPE_CLASSES, make_shapes
from sslplug.plugins import PluginRegistry

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# the frozen plugin packages under fixtures/ are data for the tests, not tests to collect
collect_ignore = ["fixtures"]

# BYOL with narrow heads and a handful of steps: enough to exercise every part of the loop.
FAST = [
    "train.batch_size=32",
    "train.disable=['progress']",
    "train.log_every=1",
    "data.workers=0",
    "knn.k=10",
    "knn.every=1",
    "health.every=1",
    "health.samples=256",
    "byol.projector_hidden_dim=64",
    "byol.predictor_hidden_dim=64",
    "byol.projection_dim=32",
]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # two threads, or one in each of pytest-xdist's workers (``-n 2`` shares the two cores)
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    reg.load_entry_points()
    return reg


def write_images(
    images: torch.Tensor, labels: torch.Tensor, root: Path, classes: bool = True
) -> None:
    """Save uint8 images as PNG files, in class subfolders when ``classes``."""
    root.mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / SHAPE_CLASSES[int(label)] if classes else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")


@pytest.fixture
def with_plugin(monkeypatch: pytest.MonkeyPatch):
    """``with with_plugin(plugin, name): main([...])``: the command line runs with one more
    plugin registered beside the installed ones (a real plugin object, through the registry's
    own ``register``)."""
    import sslplug.commands

    load = sslplug.commands._load_registry

    @contextlib.contextmanager
    def extra(plugin: object, name: str) -> Iterator[None]:
        def load_with_extra(strict: bool) -> PluginRegistry:
            registry = load(strict)
            assert registry.register(plugin, name)
            return registry

        with monkeypatch.context() as patch:
            patch.setattr(sslplug.commands, "_load_registry", load_with_extra)
            yield

    return extra


@pytest.fixture
def tiny_folder():
    """``tiny_folder(root, count, classes=0, size=16)``: ``count`` random PNG images of
    ``size`` pixels in ``root``, spread over ``classes`` class folders (none: a flat folder);
    returns ``root``."""

    def make(root: Path, count: int, classes: int = 0, size: int = 16) -> Path:
        generator = torch.Generator().manual_seed(count)
        for index in range(count):
            folder = root / f"c{index % classes}" if classes else root
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{index:04d}.png")
        return root

    return make


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled image folder with train/ and test/ splits: 8 and 2 images of each shape."""
    root = tmp_path_factory.mktemp("shapes")
    train, train_labels = make_shapes(per_class=8, seed=0)
    test, test_labels = make_shapes(per_class=2, seed=1)
    write_images(train, train_labels, root / "train")
    write_images(test, test_labels, root / "test")
    return root


@pytest.fixture
def fast_args(shapes_folder: Path, tmp_path: Path) -> list[str]:
    """``sslplug run`` arguments for a two-epoch BYOL run on ``shapes_folder``."""
    args = ["run", "--data", str(shapes_folder), "--epochs", "2", "--out", str(tmp_path / "run")]
    for item in FAST:
        args += ["--set", item]
    return args


def _distribution_name(source: Path) -> str:
    return tomllib.loads((source / "pyproject.toml").read_text())["project"]["name"]


def _distributions_seen_here() -> set[str]:
    """Distributions that give this test process an ``sslplug`` entry point."""
    return {ep.dist.name for ep in importlib.metadata.entry_points(group="sslplug") if ep.dist}


class ThrowawayVenv:
    """A virtual environment in a temporary folder, for tests that ``pip install`` plugins.

    It sees every package of the interpreter running the tests (torch, sslplug, pip, setuptools)
    through a ``.pth`` file, so nothing is reinstalled, while what is installed into it stays
    there: a test run that is interrupted cannot leave a plugin in the project's environment.
    """

    def __init__(self, root: Path, sources: Path) -> None:
        self.root = root
        self._sources = sources
        bindir = "Scripts" if os.name == "nt" else "bin"
        self.python = root / bindir / ("python.exe" if os.name == "nt" else "python")
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
        )
        site_packages = self.run(
            "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", check=True
        ).stdout.strip()
        # addsitedir, not a bare path, so that the host's own .pth files (the editable install
        # of sslplug among them) are processed too
        host = sysconfig.get_paths()["purelib"]
        (Path(site_packages) / "_sslplug_test_host.pth").write_text(
            f"import site; site.addsitedir({host!r})\n"
        )

    def run(
        self, *args: str, cwd: Path | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run this environment's python with ``args``."""
        return subprocess.run(
            [str(self.python), *args],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=cwd or self.root,
            check=check,
        )

    def sslplug(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the ``sslplug`` command line in this environment."""
        return self.run("-m", "sslplug", *args)

    def pip(self, *args: str) -> None:
        done = self.run("-m", "pip", "-q", "--disable-pip-version-check", *args)
        assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stderr[-3000:]}"

    def entry_points(self) -> set[tuple[str, str]]:
        """The ``sslplug`` entry points this environment sees, as (plugin, distribution)."""
        listing = self.run(
            "-c",
            "import importlib.metadata as m\n"
            "for ep in m.entry_points(group='sslplug'):\n"
            "    print(ep.name, ep.dist.name if ep.dist else '-')",
            check=True,
        ).stdout
        return {(name, dist) for name, dist in map(str.split, listing.splitlines())}

    @contextlib.contextmanager
    def installed(self, *sources: Path, editable: bool = False) -> Iterator[list[Path]]:
        """Install the distributions in the folders ``sources`` for the duration of the block.

        pip installs copies made in a temporary folder, so that its ``build/`` and ``*.egg-info``
        never land next to the sources. Yields the copies. On leaving, the distributions are
        uninstalled; both ways the test process is checked not to see them.
        """
        copies = [
            Path(shutil.copytree(source, Path(tempfile.mkdtemp(dir=self._sources)) / source.name))
            for source in sources
        ]
        names = {_distribution_name(copy) for copy in copies}
        args = ["install", "--no-deps", "--no-build-isolation"]
        for copy in copies:
            args += ["-e", str(copy)] if editable else [str(copy)]
        self.pip(*args)
        try:
            seen = {dist for _, dist in self.entry_points()}
            assert names <= seen, f"installed {sorted(names)}; the environment sees {sorted(seen)}"
            assert not names & _distributions_seen_here(), "pip installed into the test process"
            yield copies
        finally:
            self.pip("uninstall", "-y", *names)
            assert not names & _distributions_seen_here(), "pip installed into the test process"


@pytest.fixture(scope="session")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayVenv]:
    """One throwaway virtual environment for the whole test session; see ``ThrowawayVenv``."""
    before = _distributions_seen_here()
    venv = ThrowawayVenv(
        tmp_path_factory.mktemp("plugin-venv"), tmp_path_factory.mktemp("plugin-sources")
    )
    yield venv
    assert _distributions_seen_here() == before, "a test installed a plugin into this process"


# Linux capabilities that let root ignore file permissions; dropped, root meets them like anyone
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _limit(unprivileged: bool, max_file_bytes: int | None):
    """What the child does before it runs: give up root's power over permissions, cap the size
    of the files it writes."""

    def prepare() -> None:
        if max_file_bytes is not None:
            import resource
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap: EFBIG, not death
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        if unprivileged and os.geteuid() == 0:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
                if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return prepare


@pytest.fixture
def run_cli(tmp_path_factory: pytest.TempPathFactory):
    """``run_cli(args, unprivileged=False, max_file_bytes=None)``: ``python -m sslplug ARGS``
    in a child process, returning the ``CompletedProcess`` (text output).

    ``unprivileged`` drops root's power to ignore file permissions (the tests run as root in
    CI), so that a folder without write permission really refuses writes;
    ``max_file_bytes`` caps the size of any file the child writes (``RLIMIT_FSIZE``), as a full
    disk would: a write past it fails with ``EFBIG``.
    """
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o777)

    def run(
        args: list[str], unprivileged: bool = False, max_file_bytes: int | None = None
    ) -> subprocess.CompletedProcess:
        env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, "-m", "sslplug", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=_limit(unprivileged, max_file_bytes),
            timeout=600,
            check=False,
        )

    return run


def fake_distribution(root: Path, name: str, plugins: dict[str, str]) -> Path:
    """Lay out distribution ``name`` in ``root`` as pip would: one module per plugin,
    ``{plugin}_plugin.py`` with the given source, and a ``.dist-info`` folder whose
    ``entry_points.txt`` advertises them. Put ``root`` on ``sys.path`` to install it."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"{plugin} = {plugin}_plugin" for plugin in plugins]
    (info / "entry_points.txt").write_text("[sslplug]\n" + "\n".join(lines) + "\n")
    for plugin, source in plugins.items():
        (root / f"{plugin}_plugin.py").write_text(source)
    return root
