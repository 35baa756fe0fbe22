"""Data: the embedded default, image folders, torchvision offline, and the loader."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from sslplug.config import DataSettings
from sslplug.data import Loader, Split, load_data, make_shapes
from sslplug.errors import DataError

from .conftest import write_images


def test_shapes_are_deterministic_balanced_uint8():
    a, la = make_shapes(per_class=20, seed=3)
    b, lb = make_shapes(per_class=20, seed=3)
    c, _ = make_shapes(per_class=20, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (200, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert torch.bincount(la).tolist() == [20] * 10


def test_shapes_differ_only_in_shape_not_in_brightness():
    images, labels = make_shapes(per_class=50, seed=0)
    pixels = images.float().mean(1).flatten(1) / 255
    dark = torch.stack([row[row < 0.5].mean() for row in pixels])
    light = torch.stack([row[row >= 0.5].mean() for row in pixels])
    # every image: the same two levels, ground 0.15 and shape 0.85 (plus noise)
    assert (dark - 0.15).abs().max() < 0.03 and (light - 0.85).abs().max() < 0.03
    shape_share = (pixels >= 0.5).float().mean(1)
    assert all(shape_share[labels == k].mean() < 0.6 for k in range(10))


def test_default_data_has_labelled_train_and_test():
    data = load_data(DataSettings())
    assert data.name == "shapes" and data.image_size == 32 and data.num_classes == 10
    assert len(data.train) == 5000 and len(data.test) == 1000
    assert data.train.labelled and data.test.labelled


def test_image_folder_with_splits_and_classes(shapes_folder):
    data = load_data(DataSettings(name=str(shapes_folder), workers=0))
    assert data.classes[:2] == ("bar", "disk")  # sorted folder names
    assert data.train.images.shape == (80, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert len(data.test) == 20 and data.test.labelled


def test_image_folder_is_stored_near_the_crop_size_and_loaded_as_squares(shapes_folder):
    data = load_data(DataSettings(name=str(shapes_folder), image_size=24, workers=0))
    # stored with the shorter side at ceil(1.15 * 24) = 28 px, not squashed to the crop size
    assert data.image_size == 24 and data.train.images.shape[-2:] == (28, 28)
    loader = Loader(data.train, 16, torch.device("cpu"), shuffle=False, drop_last=False)
    images, _ = next(iter(loader.epoch(0)))
    assert images.shape == (16, 3, 24, 24) and images.dtype == torch.uint8


def test_flat_folder_is_unlabelled(tmp_path):
    images, labels = make_shapes(per_class=1, seed=0)
    write_images(images, labels, tmp_path, classes=False)
    data = load_data(DataSettings(name=str(tmp_path), workers=0))
    assert len(data.train) == 10 and data.test is None
    assert not data.train.labelled and data.num_classes == 0


def test_labelled_folder_without_test_split_holds_out_a_seeded_fraction(tmp_path):
    images, labels = make_shapes(per_class=10, seed=0)
    write_images(images, labels, tmp_path)
    a = load_data(DataSettings(name=str(tmp_path), workers=0, test_fraction=0.2), seed=1)
    b = load_data(DataSettings(name=str(tmp_path), workers=0, test_fraction=0.2), seed=1)
    assert len(a.test) == 20 and len(a.train) == 80
    assert torch.equal(a.test.images, b.test.images)


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(
        DataError, match=r"'nowhere' is neither a built-in data set \(shapes, cifar10"
    ):
        load_data(DataSettings(name="nowhere"))
    with pytest.raises(DataError, match=r"no images found in .*expected class subfolders"):
        load_data(DataSettings(name=str(tmp_path)))


def _mixed_folder(root):
    cls = root / "things"
    cls.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(cls / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(cls / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])).save(cls / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(cls / "deep.png")
    (cls / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.fromarray(rgb[:1, :1]).save(cls / "tiny.png")  # one pixel
    big = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(cls / "whole.jpg")
    (cls / "truncated.jpg").write_bytes((cls / "whole.jpg").read_bytes()[:300])
    (cls / "whole.jpg").unlink()
    return cls


def test_unreadable_images_are_skipped_and_counted_and_modes_converted(tmp_path):
    _mixed_folder(tmp_path)
    data = load_data(DataSettings(name=str(tmp_path), image_size=16, workers=0, test_fraction=0))
    assert data.skipped == 2  # the broken and the truncated file
    # images of their own sizes (20x30 and one pixel), each at most 19 px on its shorter side
    assert data.train.store is not None and len(data.train) == 5
    assert sorted(data.train.store.shapes.tolist()) == [[1, 1]] + [[19, 28]] * 4
    assert data.train.squares().images.shape == (5, 3, 16, 16)


def test_strict_mode_names_the_unreadable_file(tmp_path):
    _mixed_folder(tmp_path)
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.jpg'.*data\.strict=false"):
        load_data(DataSettings(name=str(tmp_path), image_size=16, workers=0, strict=True))


def test_large_folder_streams_through_workers(shapes_folder):
    data = load_data(DataSettings(name=str(shapes_folder), workers=0, cache_gb=0.0))
    assert data.train.images is None and data.train.source is not None
    loader = Loader(data.train, 16, torch.device("cpu"), shuffle=True, drop_last=True, workers=0)
    batches = list(loader.epoch(0))
    assert len(batches) == 5
    assert all(b.dtype == torch.uint8 and b.shape == (16, 3, 32, 32) for b, _ in batches)


def test_torchvision_data_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 was not found under .*data\.download=true"):
        load_data(DataSettings(name="cifar10", root=str(tmp_path)))


def test_loader_order_depends_on_seed_and_epoch_only():
    split = Split(
        images=torch.arange(100, dtype=torch.uint8)
        .view(100, 1, 1, 1)
        .expand(100, 3, 2, 2)
        .contiguous(),
        labels=torch.arange(100),
    )

    def order(seed, epoch):
        loader = Loader(split, 10, torch.device("cpu"), shuffle=True, drop_last=True, seed=seed)
        return torch.cat([lab for _, lab in loader.epoch(epoch)])

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 2))
    assert sorted(order(0, 1).tolist()) == list(range(100))


def test_loader_drops_the_last_partial_batch_only_when_asked():
    split = Split(
        images=torch.zeros(25, 3, 2, 2, dtype=torch.uint8),
        labels=torch.zeros(25, dtype=torch.int64),
    )
    assert len(Loader(split, 10, torch.device("cpu"), True, drop_last=True)) == 2
    assert len(Loader(split, 10, torch.device("cpu"), False, drop_last=False)) == 3


def test_streamed_unreadable_files_are_counted_once_each_by_the_loader(tmp_path):
    images, labels = make_shapes(per_class=1, seed=0)
    write_images(images, labels, tmp_path, classes=False)
    for name in ("a.png", "b.jpg", "c.png"):
        (tmp_path / name).write_bytes(b"not an image")
    settings = DataSettings(name=str(tmp_path), image_size=16, workers=0, cache_gb=0.0)
    data = load_data(settings)
    assert data.train.images is None and data.skipped == 0  # streamed: nothing decoded yet
    loader = Loader(data.train, 4, torch.device("cpu"), shuffle=True, drop_last=False, workers=0)
    assert sum(len(b) for b, _ in loader.epoch(0)) == 10 and loader.skipped == 3
    list(loader.epoch(1))  # the same three files again: still three images skipped
    assert loader.skipped == 3


def _many_images(root, count, sizes=((16, 16),)):
    """``count`` small PNG files in two class folders, image ``i`` filled with ``i % 251``
    and of shape ``sizes[i % len(sizes)]``."""
    for index in range(count):
        folder = root / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = sizes[index % len(sizes)]
        Image.new("RGB", (width, height), (index % 251, 0, 0)).save(folder / f"{index:05d}.png")


def _with_open_files(limit):
    import resource

    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return set_limit


def _sslplug(commands, limit, cwd):
    """The sslplug ``commands`` (argument lists) one after another in one child process whose
    open files are limited to ``limit``; it stops at the first that fails."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\nfrom sslplug.cli import main\n"
        f"for command in {commands!r}:\n"
        "    if main(command):\n        sys.exit(2)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True,
        preexec_fn=_with_open_files(limit), env=env, timeout=300,
    )


def test_a_folder_of_more_images_than_open_files_trains_and_prepares(tmp_path):
    """Decoding a folder in workers passes each returned tensor through a file descriptor;
    images packed per batch keep that to a few per batch, so a folder of 3x the open-file
    limit trains (equal sizes: one tensor) and prepares (own sizes: a store) under it."""
    limit, count = 256, 768
    _many_images(tmp_path / "same", count)
    _many_images(tmp_path / "mixed", count, sizes=((16, 16), (16, 20), (24, 18)))
    run = [
        "run", "--data", "same", "--epochs", "1", "--out", "r", "--no-progress",
        "--disable", "knn", "--disable", "tensorboard", "--disable", "health",
        "--set", "train.max_steps_per_epoch=1", "--set", "data.workers=2",
    ]
    done = _sslplug([run, ["prepare", "mixed", "p", "--workers", "2"]], limit, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1/1: loss" in done.stdout + done.stderr
    assert f"{count - count // 10} images" in done.stdout  # a tenth held out as the test split
    stored = load_data(DataSettings(name=str(tmp_path / "p")))
    assert len(stored.train) + len(stored.test) == count


@pytest.mark.parametrize("sizes", [((16, 16),), ((16, 16), (16, 20), (24, 18))])
def test_images_decoded_in_workers_equal_those_decoded_in_the_main_process(tmp_path, sizes):
    _many_images(tmp_path, 150, sizes)
    settings = DataSettings(name=str(tmp_path), test_fraction=0)
    here = load_data(attrs.evolve(settings, workers=0))
    there = load_data(attrs.evolve(settings, workers=2))
    assert torch.equal(here.train.labels, there.train.labels)
    if len(sizes) == 1:
        assert here.train.images.shape == (150, 3, 16, 16)
        assert torch.equal(here.train.images, there.train.images)
        assert here.train.images[7, 0, 0, 0] == 14  # c0/ holds the even indices, listed first
    else:
        a, b = here.train.store, there.train.store
        assert a is not None and b is not None and len(a) == 150
        assert torch.equal(a.shapes, b.shapes) and torch.equal(a.offsets, b.offsets)
        assert all(torch.equal(x, y) for x, y in zip(a.images(range(150)), b.images(range(150))))
        assert sorted({tuple(s) for s in a.shapes.tolist()}) == [(16, 16), (16, 20), (24, 18)]
