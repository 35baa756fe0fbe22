"""The picture on the README's first screen: the kNN accuracy of the default run over its epochs.

Reads the ``summary.json`` of a finished run (the randomly initialised encoder at epoch 0, then
every kNN measurement) and writes a PNG::

    sslplug run --plugin byol --out runs/byol-default
    python benchmarks/default_run_figure.py runs/byol-default docs/img/default_run.png

Needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run's folder")
    parser.add_argument("png", type=Path, help="where the picture goes")
    args = parser.parse_args()
    summary = json.loads((args.run / "summary.json").read_text())
    points = [(0, summary["knn_top1_random_init"])]
    points += [(entry["epoch"], entry["top1"]) for entry in summary["knn_history"]]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, top1 = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(epochs, top1, marker="o", color="tab:blue")
    for epoch, value in points:
        ax.annotate(
            f"{value:.1f}%",
            (epoch, value),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=9,
        )
    ax.set_xlabel("epoch (0: the randomly initialised encoder)")
    ax.set_ylabel("kNN top-1 on the test split (%)")
    ax.set_title(
        f"sslplug run --plugin byol: {summary['data']} data, {summary['backbone']} backbone",
        fontsize=10,
    )
    ax.set_xticks(list(epochs))
    ax.set_ylim(min(top1) - 5, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
