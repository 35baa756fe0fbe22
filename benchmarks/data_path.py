"""The data path of a folder of photos: sslplug's against torchvision's per-image pipeline.

    python benchmarks/make_photos.py /tmp/photos50k --count 50000
    sslplug prepare /tmp/photos50k /tmp/photos50k.raw --image-size 64
    sslplug prepare /tmp/photos50k /tmp/photos50k.jpeg --image-size 64 --encoding jpeg
    python benchmarks/data_path.py --data /tmp/photos50k --prepared /tmp/photos50k.raw \\
        --prepared /tmp/photos50k.jpeg --image-size 64 --batch 256 --workers 2 --batches 40

(``benchmarks/data_path.sh`` does all of it, and measures the data-wait share of training.)

Each path turns the folder into what SSL trains on: two views of every image, each a random
resized crop (area 8% to 100%, taken at the image's own resolution) resized to
``--image-size``, flipped at random, as normalised floats. The paths:

* ``baseline``: torchvision's ``ImageFolder`` (PIL decodes in the workers) with
  ``transforms.v2`` ``RandomResizedCrop`` and ``RandomHorizontalFlip`` applied twice per image,
  then ``ToImage``, ``ToDtype`` and ``Normalize``, in a ``DataLoader`` of ``--workers`` workers:
  how the public SSL code bases read a folder.
* ``prepared-raw``, ``prepared-jpeg``: ``sslplug.data.load_data`` of a folder that ``sslplug
  prepare`` wrote (``--prepared``, named by its encoding) with ``cache_gb=0`` (read from disk
  a batch at a time, never held in memory), and ``Loader(full_resolution=True)`` with the same
  workers; its padded uint8 canvases are cropped in this process, as a batch, by
  ``MultiViewGenerator`` of two ``crop_flip_recipe`` pipelines (the CPU is the device here).
* ``streamed``: the same straight from the JPEG folder, decoding in the workers.

Speed is measured in one process: the paths take turns, group by group (each group starts
with untimed batches that drain what the workers prefetched while another path ran), and the
figures are medians over ``--repeats`` groups of ``--batches`` batches; a ratio to the
baseline is the median of the ratios of groups measured one after the other, so a slow spell
of a shared machine slows both sides of a ratio. ``--threads`` (1) is this process's torch
threads, so that every path has ``--workers`` worker processes and one main process.

Memory is measured for each path alone in a fresh process that reads ``--warmup`` plus
``--batches`` batches, sampled every 50 ms from Linux's ``/proc``: ``peak_pss_gib`` is the
largest sum of the proportional set size (``smaps_rollup``) of that process and all its
workers, which counts a page shared by several of them once; ``peak_pss_anon_gib`` is its
anonymous part (no file pages); ``peak_rss_main_gib`` and ``peak_rss_worker_gib`` are the peak
resident sets (``VmHWM``) of the main process and of its largest worker, which count shared
pages in each. (``getrusage``'s ``ru_maxrss`` would not do: Linux carries it over from the
parent across ``exec``, into this fresh process and any subprocess it starts.)

Prints a table and writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2 as T

from sslplug.augment import MEAN, STD, MultiViewGenerator, crop_flip_recipe
from sslplug.config import DataSettings
from sslplug.data import STORE_MARKER, Loader, load_data

CROP_SCALE = (0.08, 1.0)
PATHS = ("baseline", "prepared", "streamed")  # every --prepared folder is a path of its own
GIB = 2**30
Batches = Generator[int, None, None]  # the images of each batch of two views, endlessly


class TwoViews:
    """A per-image transform applied twice to the same image, as SSL data sets do."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


def baseline_batches(folder: Path, size: int, batch: int, workers: int, seed: int) -> Batches:
    """torchvision's per-image path, endlessly; yields the images of each batch of two views."""
    view = T.Compose(
        [
            T.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(folder), transform=TwoViews(view)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        for (first, second), _ in loader:
            _check_views(first, second, batch, size)
            yield len(first)


def sslplug_batches(data: Path, size: int, batch: int, workers: int, seed: int) -> Batches:
    """sslplug's path from ``data`` (a folder, or what ``sslplug prepare`` wrote), endlessly."""
    dataset = load_data(
        DataSettings(name=str(data), image_size=size, cache_gb=0, workers=workers), seed
    )
    loader = Loader(
        dataset.train,
        batch,
        torch.device("cpu"),
        shuffle=True,
        drop_last=True,
        seed=seed,
        workers=workers,
        full_resolution=True,
    )
    views = MultiViewGenerator([crop_flip_recipe(size, CROP_SCALE) for _ in range(2)])
    for epoch in itertools.count():
        for images, _, extents in loader.epoch(epoch):
            with torch.no_grad():
                first, second = views(images, extents).images
            _check_views(first, second, batch, size)
            yield len(first)


def _check_views(first: torch.Tensor, second: torch.Tensor, batch: int, size: int) -> None:
    """Both views are float ``(B, 3, size, size)``, ``B`` at most ``batch`` (a streamed batch
    leaves unreadable files out)."""
    for view in (first, second):
        if view.shape[1:] != (3, size, size) or len(view) > batch or view.dtype != torch.float32:
            raise RuntimeError(
                f"a path made views of shape {tuple(view.shape)} and dtype {view.dtype}; "
                f"expected ({batch}, 3, {size}, {size}) float32"
            )


def open_path(name: str, args: argparse.Namespace) -> Batches:
    """The batches of path ``name``: ``baseline``, ``streamed`` or one of ``prepared_names``."""
    make = baseline_batches if name == "baseline" else sslplug_batches
    data = args.data if name in ("baseline", "streamed") else args.prepared_names[name]
    return make(data, args.image_size, args.batch, args.workers, args.seed)


def prepared_names(folders: list[Path]) -> dict[str, Path]:
    """``prepared-ENCODING`` for each folder ``sslplug prepare`` wrote (``-2``... for repeats)."""
    names: dict[str, Path] = {}
    for folder in folders:
        marker = json.loads((folder / STORE_MARKER).read_text())
        base = name = f"prepared-{marker['encoding']}"
        for number in itertools.count(2):
            if name not in names:
                break
            name = f"{base}-{number}"
        names[name] = folder
    return names


def timed_group(batches: Batches, warmup: int, count: int) -> float:
    """Images per second over ``count`` batches, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    images = sum(next(batches) for _ in range(count))
    return images / (time.perf_counter() - start)


def measure_speed(names: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Images per second of every path in every group, the paths taking turns."""
    paths = {name: open_path(name, args) for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name, batches in paths.items():
            rates[name].append(timed_group(batches, args.warmup, args.batches))
            print(f"group {repeat + 1}/{args.repeats}: {name} {rates[name][-1]:.0f} img/s")
    for batches in paths.values():
        batches.close()  # stops its workers
    return rates


# ------------------------------------------------------------------------------------------
# memory, for one path alone in a fresh process (``--memory-of``)


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as file:
                    children = [int(child) for child in file.read().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def _memory_kib(pid: int) -> dict[str, int]:
    """``Pss`` and ``Pss_Anon`` (``smaps_rollup``) and ``VmHWM`` (``status``) of a process,
    KiB; empty once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup, open(f"/proc/{pid}/status") as status:
            for line in [*rollup, *status]:
                key, _, value = line.partition(":")
                if key in ("Pss", "Pss_Anon", "VmHWM"):
                    fields[key] = int(value.split()[0])
    except OSError:
        return {}
    return fields


class TreeMemory:
    """Samples the memory of this process and its descendants (its workers) until stopped:
    the peak of their summed PSS and of its anonymous part, the peak resident set (VmHWM) of
    this process and the largest of any descendant's, all in KiB."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.pss = self.pss_anon = self.main_rss = self.worker_rss = 0
        self.available = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()
            self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        pid = os.getpid()
        main = _memory_kib(pid)
        workers = [_memory_kib(child) for child in _descendants(pid)]
        tree = [main, *workers]
        self.pss = max(self.pss, sum(m.get("Pss", 0) for m in tree))
        self.pss_anon = max(self.pss_anon, sum(m.get("Pss_Anon", 0) for m in tree))
        self.main_rss = max(self.main_rss, main.get("VmHWM", 0))
        self.worker_rss = max([self.worker_rss, *(m.get("VmHWM", 0) for m in workers)])


def peak_memory(name: str, args: argparse.Namespace) -> dict[str, float | None]:
    """Read ``warmup + batches`` batches of one path, and the memory that took (GiB; ``None``
    without Linux's ``/proc``)."""
    with TreeMemory() as tree:
        batches = open_path(name, args)
        for _ in range(args.warmup + args.batches):
            next(batches)
        batches.close()
    peaks = {
        "peak_pss_gib": tree.pss,
        "peak_pss_anon_gib": tree.pss_anon,
        "peak_rss_main_gib": tree.main_rss,
        "peak_rss_worker_gib": tree.worker_rss,
    }
    return {key: kib * 1024 / GIB if tree.available else None for key, kib in peaks.items()}


def measure_memory(name: str, argv: list[str]) -> dict[str, float | None]:
    """``peak_memory`` of path ``name`` in a fresh interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-of", name]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"measuring the memory of {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder of classes")
    parser.add_argument(
        "--prepared",
        type=Path,
        action="append",
        default=[],
        help="a folder `sslplug prepare DATA OUT` wrote (raw or jpeg); may be repeated",
    )
    parser.add_argument("--image-size", type=int, default=64, help="side of the views, 8 to 1024")
    parser.add_argument("--batch", type=_positive, default=256)
    parser.add_argument("--workers", type=_non_negative, default=2)
    parser.add_argument("--batches", type=_positive, default=40, help="timed batches a group")
    parser.add_argument("--warmup", type=_non_negative, help="untimed batches before each group")
    parser.add_argument("--repeats", type=_positive, default=3, help="groups of each path")
    parser.add_argument("--threads", type=_positive, default=1, help="torch threads here")
    parser.add_argument("--seed", type=_non_negative, default=0)
    parser.add_argument("--paths", default=",".join(PATHS), help="which, comma-separated")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--out", type=Path, default=Path("bench/data_path.json"))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # a path's name
    args = parser.parse_args(argv)
    if not 8 <= args.image_size <= 1024:
        parser.error(f"--image-size must be between 8 and 1024, got {args.image_size}")
    if not args.data.is_dir():
        parser.error(f"--data {str(args.data)!r} is not a folder; make one with make_photos.py")
    kinds = [kind.strip() for kind in args.paths.split(",") if kind.strip()]
    if not kinds or any(kind not in PATHS for kind in kinds):
        parser.error(f"--paths {args.paths!r}: give some of {', '.join(PATHS)}")
    for folder in args.prepared:
        if not (folder / STORE_MARKER).is_file():
            parser.error(
                f"--prepared {str(folder)!r} is not a folder that sslplug prepare wrote (no "
                f"{STORE_MARKER}); write it with: sslplug prepare {args.data} {folder} "
                f"--image-size {args.image_size}"
            )
    args.prepared_names = prepared_names(args.prepared) if "prepared" in kinds else {}
    args.names = [
        *(["baseline"] if "baseline" in kinds else []),
        *args.prepared_names,
        *(["streamed"] if "streamed" in kinds else []),
    ]
    if args.memory_of is not None and args.memory_of not in args.names:
        parser.error(f"--memory-of {args.memory_of!r}: give one of {', '.join(args.names)}")
    if args.warmup is None:
        args.warmup = 2 * args.workers + 2  # a DataLoader prefetches 2 batches a worker
    return args


def format_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"{s['data']}: views of {s['image_size']} px, batch {s['batch']}, {s['workers']} "
        f"workers, {s['threads']} main thread(s); median of {s['repeats']} groups of "
        f"{s['batches']} batches, each after {s['warmup']} untimed; load average "
        f"{results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} "
        f"after, {results['cpus']} CPUs",
        f"{'path':<16}{'img/s':>9}{'x baseline':>12}{'PSS GiB':>10}{'anon GiB':>10}"
        f"{'main RSS':>10}{'worker RSS':>12}",
    ]

    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for name in s["paths"]:
        r = results[name]
        ratio = results.get(f"ratio_{name}")
        memory = r.get("memory", {})
        lines.append(
            f"{name:<16}{r['images_per_second']:>9.0f}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>12}"
            f"{gib(memory.get('peak_pss_gib')):>10}{gib(memory.get('peak_pss_anon_gib')):>10}"
            f"{gib(memory.get('peak_rss_main_gib')):>10}"
            f"{gib(memory.get('peak_rss_worker_gib')):>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args)))
        return 0
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in ("names", "memory_of", "no_memory", "paths", "prepared", "prepared_names")
    }
    results: dict[str, Any] = {
        "settings": {
            **settings,
            "prepared": {name: str(folder) for name, folder in args.prepared_names.items()},
            "paths": args.names,
        },
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    rates = measure_speed(args.names, args)
    results["load_average_after"] = os.getloadavg()
    for name in args.names:
        results[name] = {
            "images_per_second": statistics.median(rates[name]),
            "images_per_second_all": rates[name],
        }
        if name != "baseline" and "baseline" in args.names:
            ratios = [ours / theirs for ours, theirs in zip(rates[name], rates["baseline"])]
            results[f"ratio_{name}"] = statistics.median(ratios)
    if not args.no_memory:
        for name in args.names:
            results[name]["memory"] = measure_memory(name, argv)
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
