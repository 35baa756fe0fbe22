"""The label-free measures against kNN accuracy, over methods, seeds and epochs.

    python benchmarks/health_study.py run --out bench/health --epochs 6 --seeds 0 1 2 --jobs 2
    python benchmarks/health_study.py report --out bench/health --figure docs/img/health.png

``run`` trains every method (``--methods``; all built-in ones by default, MAE and I-JEPA on
``vit_micro``) on the default data with its default settings but ``--epochs``, ``knn.every=1``
and ``health.every=1``, once per seed, ``--jobs`` at a time (each with one torch thread), skipping
runs whose ``summary.json`` exists; any ``--set`` is passed on. ``report`` reads the runs'
``summary.json`` files and prints, for every method, the measures after the last epoch
(mean over seeds), whether the collapse rule ever fired, the Spearman rank correlation between
effective rank and kNN accuracy across all runs and epochs and within each method, and the
monitor's cost; ``--figure`` draws kNN accuracy against each measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

METHODS = (
    "byol", "simclr", "barlow_twins", "rotnet", "jigsaw", "cpc", "moco_v2", "moco_v3",
    "nnclr", "simsiam", "vicreg", "swav", "dino", "mae", "ijepa",
)  # fmt: skip
VIT_ONLY = {"mae": "vit_micro", "ijepa": "vit_micro"}
MEASURES = (
    "rank_features", "spread_features", "rank_projections", "spread_projections",
    "alignment", "uniformity",
)  # fmt: skip


def _train(method: str, seed: int, args: argparse.Namespace) -> str:
    folder = args.out / f"{method}-s{seed}"
    if (folder / "summary.json").is_file():
        return f"{folder}: done before"
    command = [
        sys.executable, "-m", "sslplug", "run", "--plugin", method, "--seed", str(seed),
        "--epochs", str(args.epochs), "--out", str(folder), "--overwrite", "--no-progress",
        "--set", "knn.every=1", "--set", "health.every=1",
        "--set", "tensorboard.embedding_samples=0",
    ]  # fmt: skip
    if method in VIT_ONLY:
        command += ["--backbone", VIT_ONLY[method]]
    for item in args.set:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folder.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{method}-s{seed}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    return f"{folder}: exit {done.returncode}"


def run(args: argparse.Namespace) -> None:
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda job: _train(*job, args), jobs):
            print(line, flush=True)


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def _points(summary: dict[str, Any]) -> list[dict[str, float]]:
    """One point per evaluated epoch: kNN accuracy, the measures, and seconds of that epoch."""
    knn = {h["epoch"]: h for h in summary["knn_history"]}
    knn[0] = {"top1": summary["knn_top1_random_init"], "train_seconds": 0.0}
    points = []
    for h in summary["health_history"]:
        if h["epoch"] in knn:
            points.append(
                {
                    **h,
                    "knn": knn[h["epoch"]]["top1"],
                    "train_seconds": knn[h["epoch"]].get("train_seconds"),
                }
            )
    return points


def report(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[list[dict[str, float]]]] = {}
    for path in sorted(args.out.glob("*-s*/summary.json")):
        method = path.parent.name.rsplit("-s", 1)[0]
        runs.setdefault(method, []).append(_points(json.loads(path.read_text())))
    rows, all_rank, all_knn, costs = [], [], [], []
    for method, seeds in runs.items():
        last = [points[-1] for points in seeds]
        trained = [p for points in seeds for p in points if p["epoch"] > 0]
        everything = [p for points in seeds for p in points]
        rho = spearman([p["rank_features"] for p in everything], [p["knn"] for p in everything])
        row = {
            "method": method,
            "seeds": len(seeds),
            "epochs": int(last[0]["epoch"]),
            "knn": statistics.fmean(p["knn"] for p in last),
            "knn_random": statistics.fmean(points[0]["knn"] for points in seeds),
            "collapsed_epochs": sum(int(p.get("collapsed", 0)) for p in trained),
            "min_spread": min(
                min(p.get("spread_features", 9), p.get("spread_projections", 9)) for p in trained
            ),
            "spearman_rank_knn": rho,
        }
        for name in MEASURES:
            values = [p[name] for p in last if name in p]
            row[name] = statistics.fmean(values) if values else None
        rows.append(row)
        all_rank += [p["rank_features"] for p in everything]
        all_knn += [p["knn"] for p in everything]
        for points in seeds:
            for before, now in itertools.pairwise(points):
                if now.get("train_seconds") and before.get("train_seconds") is not None:
                    epoch_seconds = now["train_seconds"] - before["train_seconds"]
                    costs.append(now["health_seconds"] / epoch_seconds)
    overall = spearman(all_rank, all_knn)
    cost = statistics.median(costs) if costs else float("nan")
    print(
        f"{'method':13s} seeds ep  kNN rand->last   rank_f spread_f rank_p spread_p  "
        f"align  unif  min spread  collapsed  rho(rank,kNN)"
    )
    for r in rows:

        def f(name: str, width: int = 6, digits: int = 2, r: dict[str, Any] = r) -> str:
            v = r[name]
            return f"{v:{width}.{digits}f}" if v is not None else " " * (width - 1) + "-"

        print(
            f"{r['method']:13s} {r['seeds']:5d} {r['epochs']:2d} {r['knn_random']:6.1f}->"
            f"{r['knn']:5.1f}  {f('rank_features')} {f('spread_features', 8, 3)} "
            f"{f('rank_projections')} {f('spread_projections', 8, 3)} {f('alignment')} "
            f"{f('uniformity')} {r['min_spread']:10.3f} {r['collapsed_epochs']:10d}  "
            f"{r['spearman_rank_knn']:+.2f}"
        )
    print(
        f"Spearman rank correlation of rank_features with kNN top-1, all runs and epochs "
        f"({len(all_rank)} points): {overall:+.3f}"
    )
    print(
        f"health monitor: median {100 * cost:.2f}% of an epoch's training time per "
        f"evaluation ({len(costs)} evaluations); at the default health.every=5 that is "
        f"{100 * cost / 5:.2f}% of training time"
    )
    result = {
        "rows": rows,
        "spearman_all": overall,
        "points": len(all_rank),
        "cost_per_evaluation": cost,
    }
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.figure:
        _figure(runs, args.figure)
    return result


def _figure(runs: dict[str, list[list[dict[str, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["rank_features", "spread_features", "rank_projections", "alignment"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2))
    colours = plt.get_cmap("tab20")
    for i, (method, seeds) in enumerate(sorted(runs.items())):
        for s, points in enumerate(seeds):
            for ax, name in zip(axes, names):
                xy = [(p[name], p["knn"]) for p in points if name in p]
                if xy:
                    ax.plot(
                        *zip(*xy),
                        "o-",
                        ms=3,
                        lw=0.8,
                        alpha=0.8,
                        color=colours(i),
                        label=method if s == 0 and ax is axes[0] else None,
                    )
    for ax, name in zip(axes, names):
        ax.set_xlabel(name)
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    fig.legend(loc="lower center", ncol=8, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", nargs="+", default=list(METHODS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--epochs", type=int, default=15)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--out", type=Path, default=Path("bench/health"))
    p = sub.add_parser("report")
    p.add_argument("--out", type=Path, default=Path("bench/health"))
    p.add_argument("--figure", type=Path)
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
