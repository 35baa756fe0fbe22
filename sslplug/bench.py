"""``sslplug bench``: the speed of the data path and the training step, against the per-image
pipeline that solo-learn and lightly use.

In one process, for one method, backbone, batch size, image size and device:

1. **views**: view generation alone (augmentation included), images per second;
2. **step**: the whole training step (views, forward, loss, backward, optimizer, target update)
   with its data, images per second and the share of the time spent waiting for data;
3. the same two for the **per-image baseline**: the method's recipe as torchvision transforms,
   applied to one PIL image at a time in DataLoader workers (as torchvision's CIFAR data set
   hands them out), collated into batches and moved to the device.

Beside them, the model alone (the step on views made once) and the FLOPs of one step's forward
and backward passes (``torch.utils.flop_counter``), as TFLOP/s and, given the device's peak
(``peak_tflops``), the share of it achieved.

With ``compile`` (or ``train.compile=true`` among the ``assignments``), the encoder and the
target update are compiled as ``train.compile`` does (``runtime.compile_components``); one
step on fixed views, before anything is timed, compiles them, and its seconds are reported as
``compile_seconds``.

sslplug's own path keeps the uint8 images in memory and augments whole batches on the device
with kornia. Every figure is the median over ``repeats`` groups of ``steps`` batches, each
group after ``warmup`` batches that are not timed; the measurements take turns group by group,
and a ratio is the median of the ratios of groups measured one after the other.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from sslplug.assembly import assemble
from sslplug.augment import MEAN, STD, BYOLAugmentation, blur_kernel_size, blur_on
from sslplug.components import Views
from sslplug.config import load_config
from sslplug.data import Loader, Split
from sslplug.engine import train_step
from sslplug.optim import Optimization
from sslplug.plugins import Components, PluginRegistry
from sslplug.runtime import (
    autocast_context,
    compile_components,
    compile_failures,
    keep_freed_memory,
    resolve_device,
    resolve_precision,
)

__all__ = ["BenchSettings", "format_bench", "per_image_recipe", "run_bench"]


@attrs.frozen
class BenchSettings:
    plugin: str = "byol"
    backbone: str = "small"
    batch_size: int = 256
    image_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    baseline: bool = True
    peak_tflops: float = 0.0
    compile: bool = False
    assignments: tuple[str, ...] = ()


def per_image_recipe(
    settings: Any, image_size: int
) -> list[Callable[[Image.Image], Tensor]] | None:
    """The method's two-view recipe as per-image torchvision transforms on PIL images, or
    ``None`` for a method whose views are not a known recipe (pretext tasks, mixes)."""
    if isinstance(settings, BYOLAugmentation):
        jitter, crop = settings.jitter, settings.crop_scale
        jitter_prob, gray = settings.jitter_prob, settings.grayscale_prob
        blurs, solarizes = settings.blur_prob, settings.solarize_prob
    elif settings is not None and hasattr(settings, "color_strength"):
        s = settings.color_strength
        jitter, crop = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), settings.crop_scale
        jitter_prob, gray = settings.jitter_prob, settings.grayscale_prob
        blur = 0.5 if blur_on(settings.blur, image_size) else 0
        blurs, solarizes = (blur, blur), (0.0, 0.0)
    else:
        return None
    import torchvision.transforms as T  # loaded when the baseline is built: it takes seconds

    kernel = blur_kernel_size(image_size)
    pipelines = []
    for blur_prob, solarize_prob in zip(blurs, solarizes):
        steps: list[Any] = [
            T.RandomResizedCrop(image_size, scale=tuple(crop), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(*jitter)], p=jitter_prob),
            T.RandomGrayscale(p=gray),
        ]
        if blur_prob > 0:
            steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
        if solarize_prob > 0:
            steps.append(T.RandomSolarize(threshold=128, p=solarize_prob))
        steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
        pipelines.append(T.Compose(steps))
    return pipelines


class _PerImageViews(Dataset):
    """What a per-image pipeline's data set does: one PIL image, every view's transform."""

    def __init__(self, images: Tensor, pipelines: list[Callable[[Image.Image], Tensor]]) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.pipelines = pipelines

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        image = Image.fromarray(self.images[index])
        return tuple(pipeline(image) for pipeline in self.pipelines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(
    batches: Iterator[Any], work: Callable[[Any], None], count: int, device: torch.device
) -> tuple[float, float]:
    """Seconds waiting for ``count`` batches, and seconds in all."""
    wait = total = 0.0
    for _ in range(count):
        start = time.perf_counter()
        batch = next(batches)
        _sync(device)
        got = time.perf_counter()
        work(batch)
        _sync(device)
        end = time.perf_counter()
        wait, total = wait + got - start, total + end - start
    return wait, total


def _measure(
    tasks: dict[str, tuple[Iterator[Any], Callable[[Any], None]]],
    batch_size: int,
    settings: BenchSettings,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Images per second and data-wait share of every task, median over ``repeats`` groups.

    The tasks take turns, group by group (each group starts with ``warmup`` untimed batches,
    which also drain what workers prefetched meanwhile), so that a slow spell of a shared
    machine slows all of them rather than one.
    """
    rates: dict[str, list[float]] = {name: [] for name in tasks}
    waits: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(settings.repeats):
        for name, (batches, work) in tasks.items():
            _timed(batches, work, settings.warmup, device)
            wait, total = _timed(batches, work, settings.steps, device)
            rates[name].append(settings.steps * batch_size / total)
            waits[name].append(wait / total)
    return {
        name: {
            "images_per_second": statistics.median(rates[name]),
            "data_wait_share": statistics.median(waits[name]),
            "images_per_second_all": rates[name],
        }
        for name in tasks
    }


def _build(settings: BenchSettings, registry: PluginRegistry, device: torch.device) -> Any:
    assignments = [
        f"components.plugin={settings.plugin}",
        f"model.backbone={settings.backbone}",
        f"train.batch_size={settings.batch_size}",
        f"train.precision={settings.precision}",
        f"train.compile={str(settings.compile).lower()}",
        *settings.assignments,
    ]
    config = load_config(None, assignments, registry.settings_classes())
    if config.train.keep_freed_memory:  # as a run would
        keep_freed_memory()
    total = settings.warmup + settings.repeats * settings.steps
    assembly = assemble(
        config,
        registry,
        image_size=settings.image_size,
        device=device,
        num_classes=10,
        steps_per_epoch=total,
        total_steps=total,
    )
    return config, assembly.parts, assembly.optimization


def _stepper(
    components: Components, optimization: Optimization, autocast: Any
) -> Callable[[Any], None]:
    counter = iter(range(1 << 30))

    def step(views: Any) -> None:
        train_step(components, optimization, views, next(counter), 1 << 30, autocast)

    return step


def run_bench(settings: BenchSettings, registry: PluginRegistry) -> dict[str, Any]:
    """Measure sslplug's path and, where the method has one, the per-image baseline."""
    device = resolve_device(settings.device)
    torch.manual_seed(0)
    config, components, optimizer = _build(settings, registry, device)
    with compile_failures(device, config.train.compile):
        return _run_bench(settings, config, components, optimizer, device)


def _own_batches(split: Split, batch: int, device: torch.device) -> Iterator[Tensor]:
    """sslplug's own data path: shuffled uint8 batches of ``split`` on ``device``, epoch after
    epoch, without end."""
    loader = Loader(split, batch, device, shuffle=True, drop_last=True, workers=0)
    for epoch in range(1 << 30):
        for uint8, _ in loader.epoch(epoch):
            yield uint8


def _baseline_batches(
    dataset: _PerImageViews, settings: BenchSettings, device: torch.device
) -> Iterator[Views]:
    """The per-image baseline's data path: batches of ``dataset``'s views from DataLoader
    workers, moved to ``device``, without end."""
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=settings.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=settings.workers > 0,
    )
    while True:
        for views in loader:
            yield Views(images=tuple(v.to(device, non_blocking=True) for v in views))


def _compile_seconds(
    components: Components, step: Callable[[Any], None], fixed: Any, device: torch.device
) -> float:
    """Compile the components as ``train.compile`` does, and the seconds that one step on the
    ``fixed`` views takes to compile them."""
    compile_components(components)
    start = time.perf_counter()
    step(fixed)
    _sync(device)
    return time.perf_counter() - start


def _add_flops(
    results: dict[str, Any], step: Callable[[Any], None], fixed: Any, settings: BenchSettings
) -> None:
    """Count the FLOPs of one step on the ``fixed`` views, and add them to ``results`` with
    the TFLOP/s of the model alone and of the whole step (and their share of the peak)."""
    with FlopCounterMode(display=False) as counter:
        step(fixed)
    flops = counter.get_total_flops()
    results["model_flops_per_step"] = flops
    for key in ("sslplug_model", "sslplug_step"):
        r = results[key]
        r["tflops_per_second"] = flops * r["images_per_second"] / settings.batch_size / 1e12
        if settings.peak_tflops:
            r["peak_share"] = r["tflops_per_second"] / settings.peak_tflops


def _add_ratios(results: dict[str, Any]) -> None:
    """Add the ratios sslplug / baseline of the views and of the step, each the median of the
    ratios of groups measured one after the other, where the baseline was measured."""
    if "baseline_views" in results:
        for part in ("views", "step"):
            ours = results[f"sslplug_{part}"]["images_per_second_all"]
            theirs = results[f"baseline_{part}"]["images_per_second_all"]
            results[f"ratio_{part}"] = statistics.median(a / b for a, b in zip(ours, theirs))


def _run_bench(
    settings: BenchSettings,
    config: Any,
    components: Components,
    optimizer: Optimization,
    device: torch.device,
) -> dict[str, Any]:
    autocast = autocast_context(config.train.precision, device)
    batch = settings.batch_size
    count = batch * (settings.warmup + settings.repeats * settings.steps)
    images = torch.randint(
        0, 256, (count, 3, settings.image_size, settings.image_size), dtype=torch.uint8
    )
    split = Split(labels=torch.zeros(count, dtype=torch.long), images=images)
    step = _stepper(components, optimizer, autocast)
    with torch.no_grad():
        fixed = components.views(next(_own_batches(split, batch, device)))
    results: dict[str, Any] = {
        "settings": attrs.asdict(settings),
        "device": str(device),
        "precision": resolve_precision(config.train.precision, device).name,
        "compile": config.train.compile,
    }
    if config.train.compile:
        results["compile_seconds"] = _compile_seconds(components, step, fixed, device)

    def views_only(uint8: Tensor) -> None:
        with torch.no_grad():
            components.views(uint8)

    own = _own_batches(split, batch, device)
    tasks: dict[str, tuple[Iterator[Any], Callable[[Any], None]]] = {
        "sslplug_views": (own, views_only),
        "sslplug_model": (itertools.repeat(fixed), step),  # the model alone, on fixed views
        "sslplug_step": (own, lambda uint8: step(components.views(uint8))),
    }
    recipe = per_image_recipe(
        config.plugins.get(config.components.resolved()["augmentation"]), settings.image_size
    )
    if settings.baseline and recipe is not None:
        baseline = _baseline_batches(_PerImageViews(images, recipe), settings, device)
        tasks["baseline_views"] = (baseline, lambda views: None)
        tasks["baseline_step"] = (baseline, step)
    results.update(_measure(tasks, batch, settings, device))
    _add_flops(results, step, fixed, settings)
    _add_ratios(results)
    return results


def format_bench(results: dict[str, Any]) -> str:
    s = results["settings"]
    compiled = f", compiled in {results['compile_seconds']:.0f} s" if results["compile"] else ""
    lines = [
        f"{s['plugin']}, {s['backbone']} backbone, batch {s['batch_size']}, "
        f"{s['image_size']}px, {results['device']}, {results['precision']}{compiled}; "
        f"median of {s['repeats']} x {s['steps']} batches, each after {s['warmup']} warm-up",
        f"{'':<34}{'img/s':>10}{'data wait':>12}",
    ]
    names = {
        "sslplug_views": "sslplug: views (batched, device)",
        "baseline_views": "per-image baseline: views",
        "sslplug_model": "sslplug: model only (fixed views)",
        "sslplug_step": "sslplug: training step",
        "baseline_step": "per-image baseline: training step",
    }
    for key, label in names.items():
        if key in results:
            r = results[key]
            wait = f"{100 * r['data_wait_share']:.1f}%" if key.endswith("step") else "-"
            lines.append(f"{label:<34}{r['images_per_second']:>10.0f}{wait:>12}")
    for key in ("sslplug_model", "sslplug_step"):
        r = results[key]
        share = f", {100 * r['peak_share']:.1f}% of peak" if "peak_share" in r else ""
        lines.append(
            f"{names[key]}: {r['tflops_per_second']:.3f} TFLOP/s of forward and backward{share}"
        )
    for part in ("views", "step"):
        if f"ratio_{part}" in results:
            lines.append(f"ratio sslplug / baseline, {part}: {results[f'ratio_{part}']:.2f}x")
    if s["baseline"] and "ratio_views" not in results:
        lines.append("no per-image baseline for this method's views")
    return "\n".join(lines)
