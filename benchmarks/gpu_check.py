"""Which built-in methods train on this device, and whether the branches sslplug takes only on
CUDA work: the first two parts of ``benchmarks/gpu.sh``, each runnable alone.

    python benchmarks/gpu_check.py methods OUT [--device cuda] [--precision bf16]
        [--backbones resnet18 vit_tiny] [--methods byol simclr ...] [--steps 5] [--warmup 2]
        [--batch-size 256]
    python benchmarks/gpu_check.py branches OUT [--device cuda] [--batch-size 256] [--steps 5]

``methods`` trains every method (default: all fifteen) with every backbone through the engine,
the path of ``sslplug run``: the loader (pinned memory and non-blocking copies on CUDA), the
view generator, the step under the precision's autocast, channels-last weights, the checkpoint.
Each pair trains ``warmup + steps`` steps on the default data with the method's own settings;
the row says ``ok`` with the median images per second of the last ``steps`` steps (each step
logged, so each is timed to its end), ``fail`` with the first line of the error, or ``n/a``
where the method cannot use the backbone (MAE and I-JEPA need patch tokens). A failure does not
stop the others. Rows are appended to ``OUT/methods.jsonl`` as they finish, and pairs already
there are not trained again; after an error that leaves CUDA unusable (a device-side assert)
the script exits with status 75, and ``gpu.sh`` starts it again for the pairs left.

``branches`` runs what only CUDA runs, each with a figure, into ``OUT/branches.json``:

- ``bf16_autocast``: the backbone's output under the run's autocast is bf16, and SimCLR's step
  (ResNet-18) in bf16 against fp32 (``sslplug bench``'s measurement);
- ``channels_last``: the placed weights are channels-last, and the step with and without them;
- ``pinned_memory``: batches from memory (pinned, then copied without blocking) and from a
  prepared store on disk read in two DataLoader workers (``pin_memory=True``) arrive on the
  device, with their rates;
- ``nvjpeg``: a prepared JPEG store of photos of mixed sizes decoded on the device (TorchCodec's
  nvJPEG, a batch per call) gives the batches CPU decoding gives (mean absolute difference in
  pixel levels, equal extents), with both rates; then SimCLR trains on it (crops at the stored
  resolution on the device);
- ``torchrun``: one rank under ``torchrun`` (NCCL on CUDA, with ``train.sync_batchnorm``).

On a CPU (``--device cpu``, to try the script) the same code runs without the CUDA-only parts:
nothing is pinned, the loader is told to decode "on the device" as the CPU tests do, and the
rank uses gloo without synchronised batch norm; each row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from PIL import Image
from sslplug_methods import METHODS

import sslplug
from sslplug.assembly import assemble
from sslplug.bench import BenchSettings, run_bench
from sslplug.config import DataSettings, load_config
from sslplug.data import Loader, load_data, prepare
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError
from sslplug.nn import build_backbone
from sslplug.plugins import PluginRegistry
from sslplug.runtime import autocast_context, resolve_device

CONTEXT_LOST = 75  # exit status: CUDA cannot be used again in this process
# what a run of a few steps needs and nothing more: no monitors, no TensorBoard
QUIET = [
    "train.epochs=1",
    "train.log_every=1",
    "train.seed=0",
    "train.disable=['progress','knn','view_grid','tensorboard']",
    "knn.every=0",
    "health.every=0",
    "knn.baseline=false",
    "health.baseline=false",
    "tensorboard.embedding_samples=0",
    "data.workers=0",
    # distillation's teacher: a ResNet-18 of random weights in bf16 (the GPU machine is offline,
    # and the default teacher is downloaded); the section is there whatever the method
    "distill.teacher=random:resnet18",
]


@attrs.frozen
class CheckSettings:
    device: str = "cuda"
    precision: str = "bf16"
    batch_size: int = 256
    steps: int = 5
    warmup: int = 2


class StepRates:
    """A lifecycle plugin that keeps the images per second of every logged step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    @sslplug.hookimpl
    def sslplug_step_end(self, metrics: dict[str, float]) -> None:
        self.rates.append(metrics["images_per_second"])


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, at most 300 characters."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def mismatch_reason(exc: ComponentMismatchError) -> str:
    """Why the components do not fit, without the list of components that opens the message:
    "MAE's encoder needs the patch tokens of a Vision Transformer, and ..."."""
    return str(exc).rsplit("): ", 1)[-1].split("; ")[0]


def context_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a CUDA error after which the process cannot use
    the device again (a device-side assert, an illegal memory access)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, accelerator_error) or "CUDA error" in str(cause):
            return True
        cause = cause.__cause__
    return False


def _registry(rates: StepRates | None = None) -> PluginRegistry:
    registry = PluginRegistry()
    registry.load_entry_points()
    if rates is not None:
        registry.register(rates, "gpu_check_rates")
    return registry


@contextlib.contextmanager
def _memory(device: torch.device, row: dict[str, Any]) -> Iterator[None]:
    """Give back what the pairs before left cached (a failed one's tensors are freed only once
    its error is handled) and record this pair's peak of CUDA memory in ``row``."""
    if device.type != "cuda":
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        with contextlib.suppress(RuntimeError):  # CUDA may be lost
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def train_briefly(
    settings: CheckSettings, assignments: list[str], folder: Path
) -> tuple[dict[str, Any], list[float]]:
    """Train ``warmup + steps`` steps into ``folder``; the summary and every step's rate."""
    rates = StepRates()
    registry = _registry(rates)
    config = load_config(
        None,
        [
            *QUIET,
            f"train.max_steps_per_epoch={settings.warmup + settings.steps}",
            f"train.batch_size={settings.batch_size}",
            f"train.device={settings.device}",
            f"train.precision={settings.precision}",
            *assignments,
            f"train.out={folder}",
        ],
        registry.settings_classes(),
    )
    return train(config, registry), rates.rates


def check_method(method: str, backbone: str, settings: CheckSettings) -> dict[str, Any]:
    """One row of the table: whether ``method`` trains with ``backbone``, and how fast."""
    row: dict[str, Any] = {"method": method, "backbone": backbone}
    started = time.perf_counter()
    device = resolve_device(settings.device)
    try:
        with _memory(device, row), tempfile.TemporaryDirectory() as folder:
            assignments = [f"components.plugin={method}", f"model.backbone={backbone}"]
            summary, rates = train_briefly(settings, assignments, Path(folder) / "run")
        timed = rates[settings.warmup :] or rates
        row.update(
            status="ok",
            images_per_second=statistics.median(timed),
            loss=summary["final_loss"],
            steps=summary["steps"],
        )
    except ComponentMismatchError as exc:
        row.update(status="n/a", error=mismatch_reason(exc))
    except Exception as exc:
        traceback.print_exc()
        row.update(status="fail", error=first_line(exc), context_lost=context_lost(exc))
    row["seconds"] = time.perf_counter() - started
    return row


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _format_row(row: dict[str, Any]) -> str:
    rate = f"{row['images_per_second']:.0f} img/s" if "images_per_second" in row else ""
    error = row.get("error", "")[:100]
    return f"{row['method']:<13}{row['backbone']:<11}{row['status']:<6}{rate:>13}  {error}"


def check_methods(
    out: Path, methods: list[str], backbones: list[str], settings: CheckSettings
) -> int:
    """Every pair not yet in ``OUT/methods.jsonl``, one after another; the exit status."""
    path = out / "methods.jsonl"
    done = {(row["method"], row["backbone"]) for row in _read_rows(path)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods_settings.json").write_text(json.dumps(attrs.asdict(settings)) + "\n")
    print(f"{'method':<13}{'backbone':<11}{'status':<6}{'speed':>13}  error", flush=True)
    for backbone in backbones:
        for method in methods:
            if (method, backbone) in done:
                continue
            row = check_method(method, backbone, settings)
            with path.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(_format_row(row), flush=True)
            if row.get("context_lost"):
                print(f"!! CUDA cannot be used again in this process after {method} with "
                      f"{backbone}: the pairs left need a new one", flush=True)  # fmt: skip
                return CONTEXT_LOST
    return 0


# ------------------------------------------------------------------------------------------
# the branches only CUDA takes


def _step_rate(settings: CheckSettings, precision: str, *assignments: str) -> float:
    """SimCLR's training step with ResNet-18 in images per second (``sslplug bench``)."""
    bench = BenchSettings(
        plugin="simclr",
        backbone="resnet18",
        batch_size=settings.batch_size,
        device=settings.device,
        precision=precision,
        workers=0,
        steps=settings.steps,
        warmup=settings.warmup,
        repeats=1,
        baseline=False,
        assignments=assignments,
    )
    result = run_bench(bench, _registry())
    return float(result["sslplug_step"]["images_per_second"])


def bf16_autocast(settings: CheckSettings, folder: Path) -> dict[str, Any]:
    device = resolve_device(settings.device)
    backbone, _ = build_backbone("resnet18", 32)
    backbone.to(device)
    with torch.no_grad(), autocast_context("bf16", device):
        features = backbone(torch.rand(8, 3, 32, 32, device=device))
    bf16 = _step_rate(settings, "bf16")
    fp32 = _step_rate(settings, "fp32")
    ok = features.dtype == torch.bfloat16
    return {
        "status": "ok" if ok else "fail",
        "detail": f"ResNet-18 features in {features.dtype} under autocast; SimCLR's step "
        f"{bf16:.0f} img/s in bf16, {fp32:.0f} in fp32 ({bf16 / fp32:.2f}x)",
        "images_per_second": {"bf16": bf16, "fp32": fp32},
    }


def channels_last(settings: CheckSettings, folder: Path) -> dict[str, Any]:
    device = resolve_device(settings.device)
    registry = _registry()
    config = load_config(
        None, ["model.backbone=resnet18", "train.channels_last=true"], registry.settings_classes()
    )
    parts = assemble(config, registry, image_size=32, device=device, train=False).parts
    weights = [m.weight for m in parts.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    nhwc = sum(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    on = _step_rate(settings, settings.precision, "train.channels_last=true")
    off = _step_rate(settings, settings.precision, "train.channels_last=false")
    return {
        "status": "ok" if nhwc == len(weights) else "fail",
        "detail": f"{nhwc} of {len(weights)} convolution weights channels-last after placing; "
        f"SimCLR's step {on:.0f} img/s with, {off:.0f} without ({on / off:.2f}x)",
        "images_per_second": {"channels_last": on, "contiguous": off},
    }


def _rate(batches: Iterator[Any], size: int, device: torch.device) -> tuple[float, list[Any]]:
    """Images per second of drawing every batch of ``batches`` (synchronised at the end)."""
    start = time.perf_counter()
    drawn = list(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(drawn) * size / (time.perf_counter() - start), drawn


def _photos(root: Path, count: int) -> Path:
    """``count`` JPEG photos of mixed sizes and shapes (smooth colour fields) in two classes."""
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (60, 40), (48, 48), (36, 90), (80, 50), (44, 66)]
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        small = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        photo = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        folder = root / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.save(folder / f"{index:04d}.jpg", quality=95)
    return root


def pinned_memory(settings: CheckSettings, folder: Path) -> dict[str, Any]:
    device = resolve_device(settings.device)
    data = load_data(DataSettings(workers=0))
    batch = settings.batch_size
    loader = Loader(data.train, batch, device, shuffle=True, drop_last=True, workers=0)
    memory, drawn = _rate(loader.epoch(0), batch, device)
    prepare(DataSettings(name=str(_photos(folder / "photos", 4 * batch))), folder / "raw")
    on_disk = load_data(DataSettings(name=str(folder / "raw"), cache_gb=0.0, workers=2))
    workers = Loader(on_disk.train, batch, device, shuffle=True, drop_last=True, workers=2)
    disk, from_workers = _rate(workers.epoch(0), batch, device)
    where = {t.device.type for images, labels in drawn + from_workers for t in (images, labels)}
    pinned = "pinned" if device.type == "cuda" else "not pinned (not CUDA)"
    return {
        "status": "ok" if where == {device.type} else "fail",
        "detail": f"batches of {batch} arrive on {sorted(where)}, {pinned}: from memory "
        f"{memory:.0f} img/s, from a prepared store on disk in 2 workers {disk:.0f} img/s",
        "images_per_second": {"memory": memory, "disk_workers": disk},
    }


def nvjpeg(settings: CheckSettings, folder: Path) -> dict[str, Any]:
    device = resolve_device(settings.device)
    batch = min(settings.batch_size, 64)
    photos = _photos(folder / "photos", (settings.warmup + settings.steps + 1) * batch)
    prepare(DataSettings(name=str(photos)), folder / "jpeg", encoding="jpeg")
    data = load_data(DataSettings(name=str(folder / "jpeg"), workers=0))

    def batches(on: torch.device, on_device: bool) -> tuple[float, list[Any]]:
        loader = Loader(data.train, batch, on, True, True, seed=0, workers=0,
                        full_resolution=True)  # fmt: skip
        if on_device and on.type == "cuda" and not loader.decode_on_device:
            raise AssertionError("the loader did not choose to decode JPEG bytes on CUDA")
        loader.decode_on_device = on_device  # on the CPU, the branch as the tests run it
        return _rate(loader.epoch(0), batch, on)

    there, decoded = batches(device, True)
    host, reference = batches(torch.device("cpu"), False)
    difference = max(
        (a.cpu().float() - b.float()).abs().mean().item() for (a, _, _), (b, _, _) in
        zip(decoded, reference)
    )  # fmt: skip
    extents = all(
        (ea is None and eb is None) or torch.equal(ea.cpu(), eb)
        for (_, _, ea), (_, _, eb) in zip(decoded, reference)
    )
    on_device = all(a.device.type == device.type for a, _, _ in decoded)
    summary, rates = train_briefly(
        attrs.evolve(settings, batch_size=batch),
        ["components.plugin=simclr", "model.backbone=resnet18", f"data.name={folder / 'jpeg'}"],
        folder / "run",
    )
    codec = importlib.util.find_spec("torchcodec") is not None
    decoder = "TorchCodec (nvJPEG)" if codec and device.type == "cuda" else (
        "TorchCodec on the CPU" if codec else "PIL (TorchCodec is not installed)")  # fmt: skip
    ok = difference <= 3.0 and extents and on_device and summary["steps"] > 0
    return {
        "status": "ok" if ok else "fail",
        "detail": f"{decoder}: {there:.0f} img/s decoded for {device.type}, {host:.0f} on the "
        f"CPU; mean |difference| {difference:.2f} levels, extents "
        f"{'equal' if extents else 'differ'}; SimCLR on the store "
        f"{statistics.median(rates):.0f} img/s",
        "images_per_second": {"device": there, "cpu": host},
        "torchcodec": codec,
    }


def torchrun(settings: CheckSettings, folder: Path) -> dict[str, Any]:
    device = resolve_device(settings.device)
    sync = "true" if device.type == "cuda" else "false"  # SyncBatchNorm needs CUDA
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "sslplug", "run", "--plugin", "simclr", "--backbone", "resnet18",
        "--device", settings.device, "--batch-size", str(settings.batch_size),
        "--out", str(folder / "run"), "--no-progress",
        "--set", f"train.max_steps_per_epoch={settings.steps}",
        "--set", f"train.sync_batchnorm={sync}", "--set", f"train.precision={settings.precision}",
        *(arg for item in QUIET for arg in ("--set", item)),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    summary = folder / "run" / "summary.json"
    steps = json.loads(summary.read_text())["steps"] if summary.is_file() else 0
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return {
        "status": "ok" if done.returncode == 0 and steps == settings.steps else "fail",
        "detail": f"one rank, {backend}, sync_batchnorm {sync}: exit {done.returncode}, "
        f"{steps} steps; {lines[-1] if lines else ''}"[:300],
    }


# each takes the settings and a folder of its own, and returns its row
BRANCHES: dict[str, Callable[[CheckSettings, Path], dict[str, Any]]] = {
    "bf16_autocast": bf16_autocast,
    "channels_last": channels_last,
    "pinned_memory": pinned_memory,
    "nvjpeg": nvjpeg,
    "torchrun": torchrun,
}


def check_branches(out: Path, names: list[str], settings: CheckSettings) -> int:
    """Every branch of ``names``, each reported and the next tried after a failure."""
    rows = []
    for name in names:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                row = BRANCHES[name](settings, Path(folder))
            except Exception as exc:
                traceback.print_exc()
                row = {"status": "fail", "detail": first_line(exc)}
        row = {"branch": name, **row, "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"{name:<15}{row['status']:<6}{row['detail']}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "branches.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["methods", "branches"])
    parser.add_argument("out", type=Path, help="the folder the rows are written to")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "vit_tiny"])
    parser.add_argument("--branches", nargs="+", default=list(BRANCHES), choices=list(BRANCHES))
    args = parser.parse_args(argv)
    settings = CheckSettings(args.device, args.precision, args.batch_size, args.steps, args.warmup)
    if args.part == "methods":
        return check_methods(args.out, args.methods, args.backbones, settings)
    return check_branches(args.out, args.branches, settings)


if __name__ == "__main__":
    sys.exit(main())
