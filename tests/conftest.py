"""Shared fixtures: a loaded registry, a small labelled image folder, settings for fast runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sslplug.data import SHAPE_CLASSES, make_shapes
from sslplug.plugins import PluginRegistry

# BYOL with narrow heads and a handful of steps: enough to exercise every part of the loop.
FAST = [
    "train.batch_size=32",
    "train.progress=false",
    "train.log_every=1",
    "data.workers=0",
    "eval.knn_k=10",
    "eval.every=1",
    "byol.projector_hidden_dim=64",
    "byol.predictor_hidden_dim=64",
    "byol.projection_dim=32",
]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


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
