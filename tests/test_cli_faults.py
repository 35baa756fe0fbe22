"""Faults of the command line's paths and inputs, each made for real on a tiny folder of images:
an --out in the data folder, an empty data name, a .partial folder that is not ours, two
prepares into one OUT and a kill -9 during one, paths and seeds that used to end in a
traceback, and a data set of one image; and the counts that prepare and run print."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslplug.cli import main
from sslplug.config import DataSettings
from sslplug.data import PREPARE_LOCK, load_data, read_store
from sslplug.engine import data_line
from sslplug.errors import DataError
from sslplug.health import spread, uniformity
from sslplug.outputs import check_outside_data

# a run of a few steps: narrow heads, no progress bar, no workers
QUICK = [
    "--set", "train.disable=['progress']", "--set", "data.workers=0",
    "--set", "knn.every=1", "--set", "health.every=1",
    "--set", "byol.projector_hidden_dim=16", "--set", "byol.predictor_hidden_dim=16",
    "--set", "byol.projection_dim=8",
]  # fmt: skip


def _error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run ``sslplug ARGS`` here; it must fail with one ``sslplug: error:`` line, status 2.
    Returns that line."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslplug: error: ") and err.count("\n") == 1, err
    return err.strip()


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_an_out_in_the_data_folder_is_refused_naming_both_before_anything_is_written(
    tmp_path, tiny_folder, capsys, monkeypatch
):
    data = tiny_folder(tmp_path / "photos", 8, classes=2)
    before = _listing(data)
    real = repr(str(data.resolve()))
    same = _error(capsys, ["run", "--data", data, "--out", data, *QUICK])
    assert same == (
        f"sslplug: error: --out {str(data)!r} is the --data folder {str(data)!r} ({real}): the "
        f"files sslplug writes there (a run's views.png) would be read as data by the next run "
        f"or prepare on it; give --out a folder outside {str(data)!r}"
    )
    inside = _error(capsys, ["run", "--data", data, "--out", data / "c0" / "run", *QUICK])
    assert f"--out {str(data / 'c0' / 'run')!r} lies inside the --data folder" in inside
    # paths are resolved: through a link, and with '..'
    link = tmp_path / "link"
    link.symlink_to(data)
    through = _error(capsys, ["run", "--data", link, "--out", data / "c1" / ".." / "run"])
    assert f"lies inside the --data folder {str(link)!r} ({real})" in through
    # the default run folder, runs/PLUGIN-TIME under the current folder
    monkeypatch.chdir(data)
    default = _error(capsys, ["run", "--data", ".", *QUICK])
    assert "the default run folder 'runs/byol-" in default
    assert f"lies inside the --data folder '.' ({real})" in default
    assert default.endswith("give --out a folder outside '.'")
    monkeypatch.chdir(tmp_path)
    assert _error(capsys, ["prepare", data, data]).startswith(
        f"sslplug: error: OUT {str(data)!r} is the DATA folder {str(data)!r} ({real})"
    )
    into = _error(capsys, ["prepare", data, data / "prepared", "--workers", "0"])
    assert f"OUT {str(data / 'prepared')!r} lies inside the DATA folder" in into
    assert _listing(data) == before  # nothing written, not even a folder
    # a data folder inside the run folder is the user's business
    check_outside_data(tmp_path, str(data), "--out", "--data")


def test_an_empty_data_name_is_refused_naming_what_is_valid(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an empty name used to train, on the current folder
    valid = (
        "valid: shapes, cifar10, cifar100, stl10, or the path of an image folder, of a folder "
        "written by sslplug prepare, or of WebDataset shards (.tar)"
    )
    for args in (["--set", "data.name="], ["--data", " "], ["--set", 'data.name="  "']):
        message = _error(capsys, ["run", *args, "--out", tmp_path / "run"])
        assert message.startswith("sslplug: error: [data] data.name must name a data set, got ")
        assert message.endswith(valid)
    assert _error(capsys, ["prepare", "", tmp_path / "out"]) == (
        f"sslplug: error: DATA must name a data set, got ''; {valid}"
    )
    assert os.listdir(tmp_path) == []


def test_a_partial_folder_that_an_interrupted_prepare_did_not_leave_is_refused_and_kept(
    tmp_path, tiny_folder, capsys
):
    data = tiny_folder(tmp_path / "data", 6)
    out, partial = tmp_path / "mine", tmp_path / "mine.partial"
    prepare = ["prepare", data, out, "--workers", "0"]
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    assert _error(capsys, prepare) == (
        f"sslplug: error: {str(partial)!r} exists and is not a folder that an interrupted "
        f"sslplug prepare left behind (it has no {PREPARE_LOCK}); it may be yours, so it is left "
        f"as it is: move it aside, or give another OUT"
    )
    # the marker of a prepare, but beside a file prepare never writes: still not ours
    (partial / PREPARE_LOCK).write_text("sslplug prepare in progress: pid 1 on elsewhere\n")
    assert "(it holds 'notes.txt', which prepare does not write)" in _error(capsys, prepare)
    # a marker that is not sslplug's
    (partial / "notes.txt").unlink()
    (partial / PREPARE_LOCK).write_text("something else\n")
    assert f"(its {PREPARE_LOCK} is not sslplug's)" in _error(capsys, prepare)
    shutil.rmtree(partial)
    partial.write_text("mine")
    assert "(it is not a folder)" in _error(capsys, prepare)
    assert partial.read_text() == "mine" and not out.exists()
    # what an interrupted prepare leaves (its marker, free; shard files) is removed
    partial.unlink()
    partial.mkdir()
    (partial / PREPARE_LOCK).write_text("sslplug prepare in progress: pid 1 on elsewhere\n")
    (partial / "train-00000.bin").write_bytes(b"half")
    assert main([str(a) for a in prepare]) == 0
    assert not partial.exists() and sorted(os.listdir(out)) == [
        "index.pt", "sslplug-data.json", "train-00000.bin",
    ]  # fmt: skip
    assert read_store(out)[0]["splits"]["train"]["images"] == 6


# `sslplug prepare` in a child process that stops after writing its first image: it creates
# READY, then sleeps (holding OUT.partial) until it is killed
_SLOW_PREPARE = """
import sys, time
import sslplug.cli, sslplug.data.write

add = sslplug.data.write._SplitWriter.add

def add_then_sleep(self, image, label):
    add(self, image, label)
    open(READY, "w").close()
    time.sleep(600)

sslplug.data.write._SplitWriter.add = add_then_sleep
sys.exit(sslplug.cli.main(sys.argv[1:]))
"""


@pytest.mark.slow  # two child processes
def test_a_second_prepare_into_one_out_fails_at_once_naming_the_first_and_kill_9_keeps_nothing(
    tmp_path, tiny_folder, run_cli, capsys
):
    data = tiny_folder(tmp_path / "data", 12, classes=2)
    out, ready = tmp_path / "out", tmp_path / "ready"
    partial = tmp_path / "out.partial"
    args = ["prepare", str(data), str(out), "--workers", "0"]
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PREPARE.replace("READY", repr(str(ready))), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first prepare never wrote an image"
            time.sleep(0.2)
        capsys.readouterr()
        assert main(args) == 2  # the second, in this process
        stdout, stderr = capsys.readouterr()
        assert stderr.startswith(
            f"sslplug: error: another sslplug prepare is writing {str(out)!r} (pid {first.pid} "
            f"on "
        ), stderr
        assert stderr.endswith("wait for it to end or stop it, or give another OUT\n")
        assert stderr.count("\n") == 1 and stdout == ""
        assert (partial / "train-00000.bin").is_file()  # the first's work, untouched
    finally:
        first.kill()  # SIGKILL: nothing of the first runs after this
        first.communicate()
    # what the kill left is no data set, and no folder that looks finished
    assert not out.exists()
    with pytest.raises(DataError, match="no images found"):
        load_data(DataSettings(name=str(partial), workers=0))
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"removed {partial}, which an interrupted sslplug prepare left behind (pid " in (
        again.stderr
    )
    assert not partial.exists() and PREPARE_LOCK not in os.listdir(out)
    marker = read_store(out)[0]
    assert sum(split["images"] for split in marker["splits"].values()) == 12


def test_paths_and_seeds_that_used_to_raise_a_traceback_are_one_line_errors(
    tmp_path, tiny_folder, capsys, monkeypatch
):
    data = tiny_folder(tmp_path / "cls", 6, classes=2)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert _error(capsys, ["prepare", "../cls", "."]) == (
        f"sslplug: error: OUT '.' is {str(here)!r}, the current folder or one above it: prepare "
        f"writes a new folder and puts it in OUT's place; give the name of a new folder, such "
        f"as 'cls-prepared'"
    )
    assert "OUT '..' is " in _error(capsys, ["prepare", "../cls", ".."])
    monkeypatch.chdir(tmp_path)
    seed_range = "must be a whole number from 0 to 4294967295 (0 <= seed < 2**32)"
    for seed in ("1" * 23, "-1"):
        assert _error(capsys, ["prepare", data, "p", "--seed", seed]) == (
            f"sslplug: error: --seed {seed_range}, got {seed}"
        )
    (tmp_path / "afile").write_text("mine")
    assert _error(capsys, ["prepare", data, "afile"]) == (
        "sslplug: error: OUT 'afile' is a file, not a folder; give a new folder for the "
        "prepared data, such as 'cls-prepared'"
    )
    assert _error(capsys, ["prepare", data, "afile/sub"]) == (
        "sslplug: error: cannot create OUT 'afile/sub': 'afile' is a file, not a folder; give a "
        "path under a folder"
    )
    long = "n" * 256
    run = _error(capsys, ["run", "--data", data, "--out", f"runs/{long}", *QUICK])
    assert run == (
        f"sslplug: error: --out 'runs/{long}' holds a name of 256 bytes "
        f"('{'n' * 20}...{'n' * 12}'); a file or folder name may have at most 255 bytes here: "
        f"give a shorter name"
    )
    # prepare writes OUT.partial first, export writes temporary files: 8 and 16 bytes more
    prepared = _error(capsys, ["prepare", data, "n" * 250, "--workers", "0"])
    assert "holds a name of 250 bytes" in prepared and "at most 247 bytes here" in prepared
    exported = _error(capsys, ["export", tmp_path / "no-run", "n" * 250 + ".pt"])
    assert "OUT.pt " in exported and "at most 239 bytes here" in exported
    assert "holds a name of 256 bytes" in _error(capsys, ["export", "no-run", f"{long}/b.pt"])
    assert sorted(os.listdir(tmp_path)) == ["afile", "cls", "here"]  # nothing written


def test_the_spread_and_uniformity_of_one_embedding_are_not_measured():
    one = torch.randn(1, 8)
    assert uniformity(one) is None and spread(one) is None
    two = torch.randn(2, 8)
    assert math.isfinite(uniformity(two) or math.nan) and math.isfinite(spread(two) or math.nan)


def test_a_one_image_folder_trains_with_batch_size_1_and_says_what_it_trains_on(
    tmp_path, tiny_folder, capsys
):
    one = tiny_folder(tmp_path / "one", 1)
    out = tmp_path / "run"
    args = ["run", "--data", str(one), "--batch-size", "1", "--epochs", "2", "--out", str(out)]
    assert main([*args, *QUICK]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"data {one}: 1 train image, no test split, unlabelled\n" in err
    assert "Traceback" not in err and "math domain error" not in err

    def no_nan(text: str) -> None:
        raise AssertionError(f"summary.json holds {text}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["epochs"] == 2 and len(summary["health_history"]) == 3
    for measured in summary["health_history"]:  # measured, but not what needs two images
        assert "rank_features" in measured
        assert not {"uniformity", "spread_features", "spread_projections"} & set(measured)


def test_prepare_prints_each_split_labels_and_skipped_files_and_a_run_its_data(
    tmp_path, tiny_folder, capsys, shapes_folder
):
    data = tiny_folder(tmp_path / "cls", 20, classes=2)
    (data / "c0" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "prepared"
    assert main(["prepare", str(data), str(out), "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        f"prepared {data} for 16 px crops (shorter sides up to 19 px, raw) in {out} in "
    )
    # 21 files of 2 classes, one unreadable; a tenth (2) held out for the test split
    assert lines[1:] == [
        "  train: 18 images, labelled (2 classes), 0.0 MiB",
        "  test: 2 images, labelled (2 classes), 0.0 MiB",
        "  1 unreadable file(s) skipped",
    ]
    flat = tiny_folder(tmp_path / "flat", 3)
    assert main(["prepare", str(flat), str(tmp_path / "flat-prepared"), "--workers", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  train: 3 images, unlabelled, 0.0 MiB",
        "  0 unreadable file(s) skipped",
    ]
    # the line a run prints at its start
    settings = DataSettings(name=str(shapes_folder), workers=0)
    assert data_line(load_data(settings)) == (
        f"data {shapes_folder}: 80 train images, 20 test images, 10 classes"
    )
    assert data_line(load_data(DataSettings(name=str(out), workers=0))) == (
        f"data {out}: 18 train images, 2 test images, 2 classes"
    )


def test_a_path_to_read_with_a_name_too_long_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "n" * 256
    for command in (
        ["eval", long],
        ["finetune", long],
        ["export", long, "b.pt"],
        ["run", "--resume", long],
        ["run", "--data", f"{long}/x", "--epochs", "1", "--out", "r"],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("sslplug: error: "), err
        assert ("too long" in err or "255" in err) and "nnnnnnnnnn" in err, err


def test_a_folder_of_no_readable_image_prepares_nothing_and_says_so(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for index in range(3):
        (tmp_path / "data" / "c0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "c0" / f"{index}.jpg").write_bytes(b"not a jpeg")
    assert main(["prepare", "data", "out", "--image-size", "16", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "sslplug: error: none of the training images of 'data' could be read" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_collapse_warning_advises_what_the_run_does():
    from sslplug.monitors.health import collapse_warning

    warned = collapse_warning("spread_projections", 0.01, 4, "byol")
    stopping = collapse_warning("spread_projections", 0.01, 4, "byol", stops=True)
    assert "Set train.stop_on_collapse=true" in warned
    assert "Set train.stop_on_collapse=true" not in stopping
    assert "train.stop_on_collapse is set: the run stops now" in stopping
