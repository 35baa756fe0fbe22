"""The performance targets of the data path, measured side by side in one process each.

    python benchmarks/perf.py            # CPU: BYOL, small backbone, 32 px, batch 256
    python benchmarks/perf.py --device cuda --backbone resnet18 --batch-size 512

Runs ``sslplug bench`` (the same code) and checks the ratios of sslplug's batched, on-device
path to the per-image torchvision baseline: view generation at least ``--min-views`` times as
fast, the whole training step at least ``--min-step`` times. Exits 1 when a target is missed,
so that speed is asserted here and not in the timed test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sslplug.bench import BenchSettings, format_bench, run_bench
from sslplug.plugins import PluginRegistry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugin", default="byol")
    parser.add_argument("--backbone", default="small")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-views", type=float, default=5.0)
    parser.add_argument("--min-step", type=float, default=1.3)
    parser.add_argument("--out", type=Path, default=Path("bench/perf.json"))
    args = parser.parse_args()
    registry = PluginRegistry()
    registry.load_entry_points()
    settings = BenchSettings(
        plugin=args.plugin,
        backbone=args.backbone,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        workers=args.workers,
        steps=args.steps,
        repeats=args.repeats,
    )
    results = run_bench(settings, registry)
    print(format_bench(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    missed = [
        f"{part}: {results[f'ratio_{part}']:.2f}x < {target}x"
        for part, target in (("views", args.min_views), ("step", args.min_step))
        if results[f"ratio_{part}"] < target
    ]
    for line in missed:
        print(f"target missed, {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
