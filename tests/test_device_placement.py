"""Every tensor a training step makes sits where the step's other tensors sit: each built-in
method trains under ``PlacementCheck`` (tests/placement.py), which follows on the CPU which
tensors would live on the host and which on the accelerator if the run were on CUDA, and records
every operation that would mix them, as ``torch.arange(n)`` without ``device=`` meeting the
model's outputs does on the first GPU run.

The check itself is tested first: on single operations, for what CUDA refuses and what it
allows, and on SimCLR's loss made wrong on purpose (its labels made on the host), which it must
catch at the line that mixes them, while the loss as written passes. Then every method, in the
bf16 autocast CUDA runs in, the monitors, crops at the stored resolution and the loader.

What the check cannot see (the branches taken only on CUDA: pinned memory, nvJPEG decoding,
NCCL) is listed in docs/gpu.md with what ``benchmarks/gpu.sh`` runs for each on a GPU; the last
tests here refuse CUDA settings where there is no CUDA, and try ``gpu.sh``'s logic on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sslplug_methods import METHODS, simclr
from torch import Tensor, nn

import sslplug
from sslplug.assembly import assemble
from sslplug.config import DataSettings, RunContext
from sslplug.data import Loader, load_data, prepare
from sslplug.engine import train
from sslplug.errors import ConfigError
from sslplug.runtime import resolve_device, wrap_for_ddp
from sslplug.step import ComponentFailure
from sslplug.vit import sincos_position_embedding

from .harness import config_of, registry_with
from .placement import DEVICE, Place, PlacementCheck
from .test_method_contract import NARROW, SHORT
from .test_store import SIZES, _photo_folder

# a contrastive loss with its labels, a queue of keys, block masks on a ViT: the rest are slow
QUICK = ("simclr", "moco_v2", "ijepa")


class PlacementProbe:
    """A lifecycle plugin that, at the start of the run, says that the data set sits in host
    memory (a cached data set was made before the check began) and records the places of the
    components' weights, which the check must have seen moved to the device."""

    def __init__(self, check: PlacementCheck) -> None:
        self.check = check
        self.weights: set[Place | None] = set()
        self.full_resolution = False

    @sslplug.hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        assert run.data is not None and run.parts is not None
        for split in (run.data.train, run.data.test):
            if split is not None:
                held = [t for t in (split.images, split.labels) if t is not None]
                self.check.mark(held, Place.HOST)
        self.full_resolution = bool(getattr(run.parts.views, "full_resolution", False))
        for module in run.parts.modules().values():
            if module is not None:
                tensors = [*module.parameters(), *module.buffers()]
                self.weights |= {self.check.place_of(t) for t in tensors}


def train_checked(
    out: Path, assignments: Sequence[str]
) -> tuple[PlacementCheck, PlacementProbe, dict[str, Any]]:
    """Train on the CPU with ``assignments`` (after the short settings of the method contract),
    the whole run under a ``PlacementCheck``; the check, the probe and the run's summary."""
    check = PlacementCheck()
    probe = PlacementProbe(check)
    registry = registry_with(probe)
    config = config_of(
        registry,
        [
            *SHORT,
            "train.epochs=1",
            "train.max_steps_per_epoch=2",  # the second step meets what the first one kept
            f"train.device={DEVICE}",
            "train.precision=fp32",
            *assignments,
            f"train.out={out}",
        ],
    )
    sincos_position_embedding.cache_clear()  # made under an earlier check: no place here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with check:
            summary = train(config, registry)
    finally:
        torch.set_num_threads(before)
    assert probe.weights == {Place.DEVICE}, "the check did not see the weights placed"
    return check, probe, summary


# ------------------------------------------------------------------------------------------
# the check


class WithBuffers(nn.Module):
    """A module with a registered buffer, which ``Module.to`` moves, and a plain tensor
    attribute, which it does not."""

    scale: Tensor
    forgotten: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.forgotten = torch.full((4,), 2.0)


MISPLACED: dict[str, Callable[[Tensor, WithBuffers], Any]] = {
    "labels from arange": lambda x, m: F.cross_entropy(x, torch.arange(4)),
    "zeros beside device rows": lambda x, m: torch.cat([x, torch.zeros(1, 4)]),
    "a host vector": lambda x, m: x + torch.ones(4),
    "a one-element host tensor": lambda x, m: x * torch.tensor([2.0]),
    "a host mask in where": lambda x, m: torch.where(torch.rand(4, 4) < 0.5, x, 0.0),
    "a tensor attribute not registered": lambda x, m: x * m.forgotten,
    "a copy back to the host": lambda x, m: x.cpu() - x,
    "zeros made on the CPU by name": lambda x, m: x + torch.zeros(4, device="cpu"),
    "moved to the CPU by name": lambda x, m: x.to("cpu") - x,
    "made beside a host tensor": lambda x, m: x + torch.ones(4, device=torch.ones(4).device),
    "host values assigned at indices": lambda x, m: x.__setitem__(
        torch.tensor([0, 1]), torch.zeros(2, 4)
    ),
    "numpy data": lambda x, m: x @ torch.from_numpy(np.eye(4, dtype=np.float32)),
    "device indices into a host tensor": lambda x, m: torch.zeros(4, 4)[x.argmax(dim=1)],
}
PLACED: dict[str, Callable[[Tensor, WithBuffers], Any]] = {
    "labels on the device": lambda x, m: F.cross_entropy(x, torch.arange(4, device=x.device)),
    "a registered buffer": lambda x, m: x * m.scale,
    "a host 0-d tensor": lambda x, m: x * torch.tensor(2.0),
    "host indices into a device tensor": lambda x, m: x[torch.tensor([0, 2])],
    "a host mask into a device tensor": lambda x, m: x[torch.rand(4) < 0.5],
    "a host slice assigned": lambda x, m: x.__setitem__(slice(0, 1), torch.zeros(1, 4)),
    "made like a device tensor": lambda x, m: x + torch.zeros_like(x) + x.new_ones(4),
    "copied to the device": lambda x, m: x + torch.ones(4).to(x.device),
    "numpy data moved": lambda x, m: x @ torch.from_numpy(np.eye(4, dtype=np.float32)).to(x),
    "a parameter made there": lambda x, m: x * nn.Parameter(torch.ones(4, device=x.device)),
    "host tensors alone": lambda x, m: torch.arange(4) + torch.ones(4),
}


def _apply(operation: Callable[[Tensor, WithBuffers], Any]) -> PlacementCheck:
    with PlacementCheck() as check:
        module = WithBuffers().to(DEVICE)
        x = torch.randn(4, 4).to(DEVICE)
        operation(x, module)
    return check


@pytest.mark.parametrize("case", MISPLACED)
def test_the_check_records_what_cuda_refuses(case):
    [found] = _apply(MISPLACED[case]).misplacements
    assert found.where.startswith("tests/test_device_placement.py:"), found


@pytest.mark.parametrize("case", PLACED)
def test_the_check_lets_pass_what_cuda_allows(case):
    check = _apply(PLACED[case])
    assert not check.misplacements, check.report()


def nt_xent_host_labels(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss with the bug this file exists for: the labels ``torch.arange`` makes
    without ``device=`` sit on the host, the logits on the device."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, partner)


def nt_xent_device_labels(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The same loss with its labels made where the logits are."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    index = torch.arange(n, device=z.device)
    return F.cross_entropy(logits, torch.cat([index + n, index]))


def test_a_loss_with_host_labels_is_caught_at_its_line_and_the_fixed_one_passes(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(simclr, "nt_xent", nt_xent_host_labels)
    check, _, _ = train_checked(tmp_path / "wrong", ["components.plugin=simclr"])
    [found] = check.misplacements
    assert found.operation == "cross_entropy"
    assert found.where.startswith("tests/test_device_placement.py:")
    assert found.where.endswith("in nt_xent_host_labels")
    assert found.device == ((32, 32),) and found.host == ((32,),)  # a batch of 16, two views

    monkeypatch.setattr(simclr, "nt_xent", nt_xent_device_labels)
    check, _, summary = train_checked(tmp_path / "right", ["components.plugin=simclr"])
    assert summary["steps"] == 2
    assert not check.misplacements, check.report()


# ------------------------------------------------------------------------------------------
# the methods and the core


@pytest.mark.parametrize(
    "method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_every_method_trains_without_mixing_host_and_device_tensors(method, tmp_path):
    # in bf16 autocast, as train.precision=auto computes on CUDA: what a GPU run meets first
    check, _, summary = train_checked(
        tmp_path, [f"components.plugin={method}", *NARROW.get(method, []), "train.precision=bf16"]
    )
    assert summary["steps"] == 2
    assert not check.misplacements, check.report()


def test_the_monitors_evaluate_without_mixing_host_and_device_tensors(tmp_path):
    # the kNN and health monitors embed the data set on the device after the epoch, and the
    # view grid draws the views of a few images
    check, _, summary = train_checked(
        tmp_path,
        [
            "components.plugin=byol", *NARROW["byol"],
            "train.disable=['progress','tensorboard']",
            "knn.every=1", "health.every=1", "knn.baseline=true", "health.baseline=true",
        ],
    )  # fmt: skip
    assert summary["knn_top1_random_init"] is not None and summary["knn_top1"] is not None
    assert [point["epoch"] for point in summary["health_history"]] == [0, 1]
    assert (tmp_path / "views.png").is_file()
    assert not check.misplacements, check.report()


@pytest.mark.parametrize("method", ["simclr", pytest.param("dino", marks=pytest.mark.slow)])
def test_crops_at_the_stored_resolution_keep_their_boxes_on_the_device(method, tmp_path):
    # images of their own sizes reach the views as a padded canvas with each one's extent
    folder = _photo_folder(tmp_path / "photos", SIZES)
    check, probe, summary = train_checked(
        tmp_path / "run",
        [
            f"components.plugin={method}", *NARROW.get(method, []),
            f"data.name={folder}", "data.image_size=32", "data.test_fraction=0",
            "train.batch_size=6",
        ],
    )  # fmt: skip
    assert probe.full_resolution and summary["steps"] == 2
    assert not check.misplacements, check.report()


@pytest.mark.parametrize("on_device", [True, False], ids=["decoded there", "decoded on the host"])
def test_the_loader_hands_over_batches_on_the_device(on_device, tmp_path):
    # on CUDA a prepared store's JPEG bytes are decoded where the batch goes (nvJPEG); that
    # branch runs here on the CPU, its images, labels and extents followed to the crops
    folder = _photo_folder(tmp_path / "photos", SIZES)
    settings = DataSettings(name=str(folder), image_size=32, workers=0)
    prepare(settings, tmp_path / "prepared", encoding="jpeg")
    views = sslplug.MultiViewGenerator(sslplug.byol_recipe(32))
    with PlacementCheck() as check:
        data = load_data(DataSettings(name=str(tmp_path / "prepared"), workers=0))
        loader = Loader(data.train, 4, DEVICE, True, True, workers=0, full_resolution=True)
        assert not loader.decode_on_device  # only on CUDA by default
        loader.decode_on_device = on_device
        views.to(DEVICE)
        batches = 0
        for images, labels, extents in loader.epoch(0):
            handed = [t for t in (images, labels, extents) if t is not None]
            assert {check.place_of(t) for t in handed} == {Place.DEVICE}
            views(images, extents)
            batches += 1
    assert batches == len(loader) > 0
    assert not check.misplacements, check.report()


# ------------------------------------------------------------------------------------------
# the CUDA-only settings, refused on a machine without CUDA


def test_a_cuda_device_without_cuda_is_refused_with_what_would_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'cuda:1' but CUDA is not available here; use cpu"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_synchronised_batch_norm_is_refused_on_cpu_ranks():
    registry = registry_with()
    parts = assemble(config_of(registry, []), registry, image_size=32, device=DEVICE).parts
    with pytest.raises(ConfigError, match=r"sync_batchnorm needs CUDA devices"):
        wrap_for_ddp(parts, DEVICE, sync_batchnorm=True)


# ------------------------------------------------------------------------------------------
# benchmarks/gpu.sh, which runs on a GPU what the check cannot see, tried on the CPU

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> types.ModuleType:
    """``benchmarks/NAME.py``, a script, not a module of the package."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_reports_every_pair_and_goes_on_after_a_failure(tmp_path, capsys):
    check, report = _script("gpu_check"), _script("gpu_report")
    args = ["methods", str(tmp_path), "--device", "cpu", "--precision", "fp32"]
    args += ["--backbones", "small", "--methods", "simclr", "nosuch", "mae"]
    args += ["--steps", "1", "--warmup", "1", "--batch-size", "16"]
    assert check.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "methods.jsonl").read_text().splitlines()]
    assert [(row["method"], row["status"]) for row in rows] == [
        ("simclr", "ok"), ("nosuch", "fail"), ("mae", "n/a")
    ]  # fmt: skip
    assert rows[0]["images_per_second"] > 0 and rows[0]["steps"] == 2
    assert rows[1]["error"].startswith("PluginError: unknown plugin 'nosuch'")
    assert "\n" not in rows[1]["error"] and not rows[1]["context_lost"]
    assert rows[2]["error"].startswith("MAE's encoder needs the patch tokens")
    assert check.main(args) == 0  # the pairs done are not trained again
    assert len((tmp_path / "methods.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert report.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "1 ok, 1 fail, 1 n/a" in table and "unknown plugin 'nosuch'" in table


def test_the_gpu_check_knows_an_error_that_loses_cuda():
    check = _script("gpu_check")
    assert check.CONTEXT_LOST == 75
    try:
        try:
            raise RuntimeError("CUDA error: device-side assert triggered")
        except RuntimeError as cause:
            raise ComponentFailure("plugin 'x' raised in its loss") from cause
    except ComponentFailure as exc:
        assert check.context_lost(exc)
    assert not check.context_lost(ValueError("a bad setting"))


def _gpu_sh(out: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PRECISION": "fp32",
                   "RUN": str(out / "run_folder"), **settings}  # fmt: skip
    return subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh")],
        cwd=BENCHMARKS.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_gpu_sh_leaves_out_what_its_budget_cannot_hold(tmp_path):
    done = _gpu_sh(tmp_path, BUDGET="5", ARCHIVE=str(tmp_path / "none.tar.gz"))
    said = done.stdout
    for part in ("part (1)", "part (2)", "bench of simclr", "compiled bench of simclr"):
        assert f"!! {part} left out: " in said, said
    assert "!! part (c) left out" in said
    assert done.returncode == 1  # nothing ran: the report has nothing to print


@pytest.mark.slow  # two methods, two backbones, three branches: over a minute on two cores
def test_gpu_sh_runs_every_part_it_is_asked_for_on_the_cpu_and_ends_with_the_tables(tmp_path):
    done = _gpu_sh(
        tmp_path,
        PARTS="methods branches",
        MATRIX_BACKBONES="small vit_micro",
        MATRIX_METHODS="simclr nosuch mae",
        MATRIX_STEPS="1",
        MATRIX_WARMUP="1",
        MATRIX_BATCH="16",
        BRANCHES="pinned_memory nvjpeg torchrun",
        OMP_NUM_THREADS="1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout[done.stdout.index("== report") :]
    assert "3 ok, 2 fail, 1 n/a" in report  # nosuch failed, and the rest went on
    for branch in ("pinned_memory", "nvjpeg", "torchrun"):
        assert re.search(rf"^{branch} +ok ", report, re.MULTILINE), report
    written = json.loads((tmp_path / "report.json").read_text())
    assert {(row["method"], row["backbone"]) for row in written["methods"]} == {
        (m, b) for m in ("simclr", "nosuch", "mae") for b in ("small", "vit_micro")
    }
