"""The data-path benchmark's scripts, tiny: ``benchmarks/make_photos.py`` writes the folder it
promises, and ``benchmarks/data_path.py`` measures every path and writes what it measured
(speed is asserted on a quiet machine, never here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageOps

from sslplug.cli import main as sslplug

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_photos = _script("make_photos")
data_path = _script("data_path")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """50 photos in 5 classes: image 49 is the one stored with EXIF orientation 6."""
    out = tmp_path_factory.mktemp("photos")
    assert make_photos.make_photos(out, count=50, classes=5, seed=0, workers=1) == 50
    return out


def test_photos_are_labelled_jpegs_of_mixed_sizes(photos):
    folders = sorted(path.name for path in photos.iterdir())
    assert folders == sorted(make_photos.SHAPES[:5])
    files = sorted(photos.glob("*/*.jpg"))
    assert len(files) == 50
    assert {path.parent.name for path in files if int(path.stem) % 5 == 2} == {"triangle"}
    sizes = set()
    for path in files:
        with Image.open(path) as image:
            rotated = image.getexif().get(make_photos.EXIF_ORIENTATION_TAG)
            assert rotated == (6 if path.stem == "00049" else None), path
            assert image.format == "JPEG"
            upright = ImageOps.exif_transpose(image)
            sizes.add(upright.size)
            assert all(250 <= side <= 500 for side in upright.size), (path, upright.size)
            # noise and colour fields: far from the few hundred bytes a flat image takes
            assert path.stat().st_size > 0.05 * upright.width * upright.height
    widths, heights = zip(*sizes)
    assert len(sizes) > 40
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert max(widths) - min(widths) > 150 and max(heights) - min(heights) > 150


def test_the_exif_rotated_photo_is_upright_once_its_orientation_is_applied(photos):
    drawn, rotated = make_photos.make_photo(49, classes=5, seed=0)
    assert rotated and drawn.width != drawn.height
    with Image.open(photos / make_photos.class_name(49 % 5) / "00049.jpg") as stored:
        assert stored.size == (drawn.height, drawn.width)
        upright = np.asarray(ImageOps.exif_transpose(stored), dtype=np.int16)
    drawn_pixels = np.asarray(drawn, dtype=np.int16)
    assert np.abs(upright - drawn_pixels).mean() < 8  # JPEG's loss of the noise only
    assert np.abs(upright - drawn_pixels[::-1, ::-1]).mean() > 20  # turned the wrong way


def test_photos_are_made_once_and_resumed(photos, tmp_path):
    before = {path: path.stat().st_mtime_ns for path in photos.glob("*/*.jpg")}
    assert make_photos.make_photos(photos, count=50, classes=5, seed=0, workers=1) == 0
    assert {path: path.stat().st_mtime_ns for path in photos.glob("*/*.jpg")} == before
    partial = tmp_path / "partial"
    make_photos.make_photos(partial, count=6, classes=5, seed=0, workers=1)
    (partial / "disk" / "00005.jpg").unlink()
    assert make_photos.make_photos(partial, count=6, classes=5, seed=0, workers=2) == 1
    again = photos / "disk" / "00005.jpg"
    assert (partial / "disk" / "00005.jpg").read_bytes() == again.read_bytes()
    assert not list(partial.glob("*/.*"))  # no temporary files left behind


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--count", "0"], "--count: must be at least 1, got 0"),
        (["--classes", "11"], "--classes must be 1 to 10 (one shape each), got 11"),
        (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    ],
)
def test_make_photos_refuses_bad_input(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        make_photos.main([str(tmp_path / "out"), *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _data_path(photos: Path, out: Path, *extra: str) -> dict:
    args = ["--data", str(photos), "--image-size", "32", "--batch", "4", "--workers", "1"]
    args += ["--batches", "2", "--warmup", "1", "--repeats", "2", "--out", str(out), *extra]
    assert data_path.main(args) == 0
    return json.loads(out.read_text())


def test_data_path_measures_every_path_side_by_side(photos, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    command = ["prepare", str(photos), str(prepared), "--image-size", "32", "--workers", "0"]
    assert sslplug(command) == 0
    results = _data_path(
        photos, tmp_path / "speed.json", "--prepared", str(prepared), "--no-memory"
    )
    paths = ["baseline", "prepared-raw", "streamed"]
    assert results["settings"]["paths"] == paths
    assert results["settings"]["prepared"] == {"prepared-raw": str(prepared)}
    for name in paths:
        assert len(results[name]["images_per_second_all"]) == 2
        assert results[name]["images_per_second"] > 0
        assert "memory" not in results[name]
    assert results["ratio_prepared-raw"] > 0 and results["ratio_streamed"] > 0
    table = capsys.readouterr().out
    assert "prepared-raw" in table and "x baseline" in table


def test_data_path_measures_memory_in_a_fresh_process(photos, tmp_path):
    memory = _data_path(photos, tmp_path / "memory.json", "--paths", "streamed")["streamed"][
        "memory"
    ]
    assert 0.05 < memory["peak_pss_gib"] < 8
    assert 0 < memory["peak_pss_anon_gib"] <= memory["peak_pss_gib"]
    assert 0.05 < memory["peak_rss_main_gib"] < 8
    assert 0.01 < memory["peak_rss_worker_gib"] < 8  # the one worker


def test_two_prepared_folders_are_two_paths(photos, tmp_path):
    for name in ("a", "b"):
        assert (
            sslplug(
                [
                    "prepare",
                    str(photos),
                    str(tmp_path / name),
                    "--image-size",
                    "32",
                    "--encoding",
                    "jpeg",
                    "--workers",
                    "0",
                ]
            )
            == 0
        )
    names = data_path.prepared_names([tmp_path / "a", tmp_path / "b"])
    assert names == {"prepared-jpeg": tmp_path / "a", "prepared-jpeg-2": tmp_path / "b"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--paths", "baseline,pillow"], "--paths 'baseline,pillow': give some of baseline"),
        (["--image-size", "4"], "--image-size must be between 8 and 1024, got 4"),
        (["--batch", "0"], "--batch: must be at least 1, got 0"),
        (["--prepared", "/nonexistent/p"], "is not a folder that sslplug prepare wrote"),
    ],
)
def test_data_path_refuses_bad_input(photos, capsys, extra, message):
    with pytest.raises(SystemExit):
        data_path.main(["--data", str(photos), *extra])
    assert message in capsys.readouterr().err


def test_data_path_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_path.main(["--data", str(tmp_path / "none")])
    assert "is not a folder; make one with make_photos.py" in capsys.readouterr().err
