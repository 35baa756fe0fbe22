"""Faults in settings and data (issue 13), each injected for real: NaN, infinities and numbers
too large for torch in any setting; data folders the user may not read; loose images beside class
folders; broken links; and the threads torch is given."""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest
import torch
from sslplug_methods import byol

from sslplug.commands import _torch_threads, main
from sslplug.config import (
    CORE_SECTIONS,
    SEED_RANGE,
    OptimSettings,
    load_config,
)
from sslplug.data import load_data, make_shapes
from sslplug.errors import ConfigError, DataError
from sslplug.monitors.knn import KNNSettings
from sslplug.plugins import PluginRegistry
from sslplug.runtime import seed_everything

from .conftest import write_images

# ------------------------------------------------------------------------------------------
# 1. numbers: NaN and infinities, seeds, whole numbers torch cannot take


def _float_settings(registry: PluginRegistry) -> dict[str, typing.Any]:
    """The type of every setting that holds floats (alone or in a list), core and plugins, by
    ``section.key``."""
    out = {}
    for section, cls in {**CORE_SECTIONS, **registry.settings_classes()}.items():
        attrs.resolve_types(cls)
        for field in attrs.fields(cls):
            if field.type is float or float in typing.get_args(field.type):
                out[f"{section}.{field.name}"] = field.type
    return out


def test_every_float_setting_of_the_core_and_the_plugins_refuses_nan_and_infinities(registry):
    types = _float_settings(registry)
    assert {"optim.lr", "optim.warmup_epochs", "knn.temperature", "byol.tau_base"} <= set(
        types
    )
    assert typing.get_origin(types["byol.crop_scale"]) is tuple
    for key, tp in types.items():
        for bad in ("nan", "inf", "-inf"):
            # a list of floats gets the bad value last, after fine ones
            fine = ["0.5"] * (len(typing.get_args(tp)) - 1)
            value = f"[{', '.join([*fine, bad])}]" if typing.get_origin(tp) is tuple else bad
            with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got {bad}"):
                load_config(
                    assignments=[f"{key}={value}"], plugin_settings=registry.settings_classes()
                )


@pytest.mark.parametrize(
    "assignment",
    ["optim.lr=nan", "optim.warmup_epochs=nan", "knn.temperature=nan", "optim.lr=inf"],
)
def test_the_issue_s_non_finite_settings_are_refused_naming_key_and_value(assignment):
    key, value = assignment.split("=")
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got {value}$"):
        load_config(assignments=[assignment], plugin_settings={"knn": KNNSettings})


def test_a_tuple_with_nan_names_the_whole_value():
    with pytest.raises(
        ConfigError, match=r"byol\.crop_scale must be a finite number, got nan in \[0\.2, nan\]"
    ):
        load_config(
            assignments=["byol.crop_scale=[0.2, nan]"], plugin_settings={"byol": byol.BYOLSettings}
        )


def test_nan_in_a_config_file_and_a_whole_number_past_the_float_range_are_refused(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[knn]\ntemperature = nan\n")
    with pytest.raises(ConfigError, match=r"knn\.temperature must be a finite number"):
        load_config(config, plugin_settings={"knn": KNNSettings})
    with pytest.raises(ConfigError, match=r"optim\.lr must be a finite number, got 1000"):
        load_config(assignments=[f"optim.lr={10**400}"])  # float() of it overflows


def test_validators_refuse_nan_in_settings_built_in_python():
    with pytest.raises(ConfigError, match=r"lr must be greater than 0, got nan"):
        OptimSettings(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"warmup_epochs must be 0 or more, got nan"):
        OptimSettings(warmup_epochs=float("nan"))
    with pytest.raises(ConfigError, match=r"temperature must be greater than 0, got nan"):
        KNNSettings(temperature=float("nan"))


@pytest.mark.parametrize("seed", [99999999999999999999, 2**32, -1])
def test_a_seed_outside_0_to_2_to_the_32_is_refused_naming_the_range(seed):
    with pytest.raises(
        ConfigError,
        match=rf"\[train\] seed must be a whole number from 0 to 4294967295 "
        rf"\(0 <= seed < 2\*\*32\), got {seed}",
    ):
        load_config(assignments=[f"train.seed={seed}"])


def test_the_largest_seed_works_everywhere_a_seed_goes():
    seed = load_config(assignments=[f"train.seed={2**32 - 1}"]).train.seed
    assert seed == SEED_RANGE.stop - 1
    seed_everything(seed)
    random.seed(seed)
    torch.manual_seed(seed * 7919 + 1023 + 10**9)  # engine: seed * 7919 + rank + step
    torch.Generator().manual_seed(seed * 100_003 + 10**6)  # the loader's epoch order


# byol.projection_dim: before, torch failed deep inside the plugin's encoder, in C++ frames
@pytest.mark.parametrize("key", ["train.epochs", "byol.projection_dim"])
def test_a_whole_number_torch_cannot_take_is_refused(key):
    with pytest.raises(ConfigError, match=rf"^{key} must fit in 64 bits .*got {2**70}$"):
        load_config(assignments=[f"{key}={2**70}"], plugin_settings={"byol": byol.BYOLSettings})


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_test_fraction_is_a_share_below_1(value):
    with pytest.raises(ConfigError, match=rf"test_fraction must be .*{value}"):
        load_config(assignments=[f"data.test_fraction={value}"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "99999999999999999999"], r"\[train\] seed must be a whole number from 0 to"),
        (["--seed", "-5"], r"\[train\] seed must be .*got -5"),
        (["--set", "optim.lr=inf"], r"optim\.lr must be a finite number, got inf"),
        (["--set", "eval.knn_temperature=nan"], r"eval\.knn_temperature must be a finite number"),
        (["--epochs", "99999999999999999999"], r"train\.epochs must fit in 64 bits"),
        (["--batch-size", "99999999999999999999"], r"train\.batch_size must fit in 64 bits"),
    ],
)
def test_the_command_line_reports_bad_numbers_as_errors(args, message, tmp_path, capsys):
    # data that does not exist: were the number let through, the run would stop there, not train
    nowhere = str(tmp_path / "nowhere")
    assert main(["run", "--data", nowhere, "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslplug: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # refused before anything started


# ------------------------------------------------------------------------------------------
# 2. data the user may not read (a child without root's power over permissions)


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    images, labels = make_shapes(per_class=2, seed=0)
    write_images(images[labels < 3], labels[labels < 3], root)  # disk, ring, square
    return root


def _quick_run(data: Path, out: Path) -> list[str]:
    """``sslplug run`` arguments for one step of a small BYOL on ``data``."""
    args = [
        "run", "--data", data, "--epochs", "1", "--out", out, "--no-progress",
        "--batch-size", "4", "--set", "train.max_steps_per_epoch=1", "--set", "data.workers=0",
        "--set", "eval.baseline=false", "--set", "eval.every=0",
        "--set", "byol.projector_hidden_dim=16", "--set", "byol.predictor_hidden_dim=16",
        "--set", "byol.projection_dim=8",
    ]  # fmt: skip
    return [str(arg) for arg in args]


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize(
    ("what", "mode", "message"),
    [
        ("root", 0o000, r"cannot read the folder '{root}': Permission denied\. Give the user"),
        ("class", 0o000, r"cannot read the folder '{root}/ring' in the data folder '{root}'"),
        ("class", 0o644, r"cannot read the folder '{root}/ring' in the data folder '{root}'"),
        ("parent", 0o000, r"cannot reach data '{root}/inner': Permission denied"),
    ],
)
def test_a_folder_that_cannot_be_read_is_an_error_naming_it(
    labelled, tmp_path, run_cli, what, mode, message
):
    data = labelled
    if what == "parent":
        data = labelled / "inner"
        data.mkdir()
        write_images(*make_shapes(per_class=1, seed=0), data, classes=False)
    locked = {"root": labelled, "class": labelled / "ring", "parent": labelled}[what]
    locked.chmod(mode)
    try:
        done = run_cli(_quick_run(data, tmp_path / "run"), unprivileged=True)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    expected = "sslplug: error: " + message.format(root=re.escape(str(labelled)))
    assert re.search(expected, done.stderr), done.stderr

@pytest.mark.slow  # a run in a subprocess
def test_an_image_that_cannot_be_read_is_skipped_and_counted(tmp_path, run_cli):
    data = tmp_path / "flat"
    write_images(*make_shapes(per_class=1, seed=0), data, classes=False)
    locked = data / "0003.png"
    locked.chmod(0o000)
    try:
        done = run_cli(_quick_run(data, tmp_path / "run"), unprivileged=True)
    finally:
        locked.chmod(0o644)
    assert done.returncode == 0, done.stderr
    assert f"skipping unreadable image {locked}: [Errno 13] Permission denied" in done.stderr
    assert f"skipped 1 unreadable image(s) under {data}" in done.stderr


# ------------------------------------------------------------------------------------------
# 3. loose images beside class folders; broken links


def test_loose_images_beside_class_folders_are_refused_counting_both(labelled):
    write_images(*make_shapes(per_class=1, seed=1), labelled, classes=False)  # 10 loose images
    with pytest.raises(
        DataError,
        match=rf"10 image\(s\) directly in '{re.escape(str(labelled))}' \(such as '0000\.png'\) "
        r"beside 3 class folder\(s\) of images \(disk, ring, square\): put the loose images in "
        r"a class folder for labelled data, or use a folder of only images for unlabelled data",
    ):
        load_data(load_config(assignments=[f"data.name={labelled}"]).data)


def test_loose_images_beside_train_are_refused(labelled, tmp_path, capsys):
    root = tmp_path / "splits"
    root.mkdir()
    labelled.rename(root / "train")
    write_images(*make_shapes(per_class=1, seed=1), root, classes=False)
    assert main(_quick_run(root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"sslplug: error: 10 image(s) directly in '{root}' (such as '0000.png') beside its " in (
        err
    )
    assert "move them into train/ or test/" in err


def test_a_flat_folder_beside_a_folder_without_images_stays_unlabelled(tmp_path):
    write_images(*make_shapes(per_class=1, seed=0), tmp_path, classes=False)
    (tmp_path / ".thumbnails").mkdir()
    (tmp_path / ".thumbnails" / "notes.txt").write_text("not an image")
    data = load_data(load_config(assignments=[f"data.name={tmp_path}", "data.workers=0"]).data)
    assert len(data.train) == 10 and data.num_classes == 0


def test_broken_links_are_skipped_counted_and_named_once(labelled, caplog):
    (labelled / "disk" / "gone.png").symlink_to(labelled / "nowhere.png")  # dangling
    (labelled / "ring" / "loop.png").symlink_to(labelled / "ring" / "loop.png")  # a loop
    (labelled / "squares").symlink_to(labelled / "lost")  # a class folder that is not there
    first_ring = sorted((labelled / "ring").iterdir())[0]
    (labelled / "ring" / "alias.png").symlink_to(first_ring)  # a link that works: one more image
    settings = load_config(assignments=[f"data.name={labelled}", "data.workers=0"]).data
    with caplog.at_level(logging.WARNING, logger="sslplug.data"):
        data = load_data(settings)
    assert data.skipped == 3
    assert len(data.train) + len(data.test) == 7 and data.classes == ("disk", "ring", "square")
    warnings = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert warnings == [
        f"skipped 3 broken symbolic link(s) under {labelled} (the target is missing, or the "
        f"link loops), such as {labelled}/squares -> {labelled}/lost"
    ]


# ------------------------------------------------------------------------------------------
# 4. threads: one per core the process may use, unless OMP_NUM_THREADS says otherwise

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="the platform cannot say which cores are allowed"
)


@needs_affinity
def test_threads_follow_the_allowed_cores_unless_omp_num_threads_is_set(monkeypatch):
    assert _torch_threads({}) == len(os.sched_getaffinity(0))
    assert _torch_threads({"OMP_NUM_THREADS": "3"}) is None
    monkeypatch.delattr(os, "sched_getaffinity")
    assert _torch_threads({}) is None


@needs_affinity
def test_main_sets_torch_threads_to_the_allowed_cores(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    try:
        assert main(["list"]) == 0
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main(["list"]) == 0
        assert torch.get_num_threads() == 2  # the user's OMP_NUM_THREADS: left alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # subprocesses
@needs_affinity
def test_a_command_pinned_to_one_core_uses_one_thread():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    core = min(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-m", "sslplug", "-v", "list"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "torch uses 1 thread(s): one per core this process may run on" in done.stderr
