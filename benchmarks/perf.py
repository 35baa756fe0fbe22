"""The performance targets of the data path, measured side by side in one process each.

    python benchmarks/perf.py            # CPU: BYOL, small backbone, 32 px, batch 256
    python benchmarks/perf.py --device cuda --backbone resnet18 --batch-size 512

Runs ``sslplug bench`` (the same command; any of its flags may be given) and checks the ratios
of sslplug's batched, on-device path to the per-image torchvision baseline: view generation at
least ``--min-views`` times as fast, the whole training step at least ``--min-step`` times.
Exits 1 when a target is missed, so that speed is asserted here and not in the timed test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sslplug.cli import main as sslplug


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-views", type=float, default=5.0)
    parser.add_argument("--min-step", type=float, default=1.3)
    parser.add_argument("--out", type=Path, default=Path("bench/perf.json"))
    args, bench_args = parser.parse_known_args()
    defaults = ["--plugin", "byol", "--backbone", "small", "--batch-size", "256", "--device", "cpu"]
    status = sslplug(["bench", *defaults, *bench_args, "--out", str(args.out)])  # later flags win
    if status:
        return status
    results = json.loads(args.out.read_text())
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
