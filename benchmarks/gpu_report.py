"""The figures of ``benchmarks/gpu.sh``, read from what it wrote under OUT, printed as tables
and written to ``OUT/report.json``.

    python benchmarks/gpu_report.py OUT [--target-epochs 500] [--epoch-images 50000]
        [--baseline-minutes 99]

Reads ``OUT/methods.jsonl`` and ``OUT/branches.json`` (``benchmarks/gpu_check.py``),
``OUT/bench/*.json`` (``sslplug bench`` of each method, without and with compile) and
``OUT/run/summary.json`` and ``settings.toml`` (the fixed-time run). Five parts, each printed
when the script wrote it:

- **methods**: every built-in method with every backbone, ``ok`` (with its images per second
  and peak of GPU memory), ``fail`` (with the first line of its error) or ``n/a``, and the
  count of each;
- **branches**: each branch only CUDA takes, ``ok`` or ``fail``, and what it measured;
- **speed**: views/s, model-alone img/s, training-step img/s and the data-wait share of each
  method, with the speed-up that compile gives;
- **fixed-time run**: epochs done, the kNN top-1 after every epoch against the seconds of
  training steps and of wall time (evaluation and checkpoints included), and the run's
  images per second (the images of an epoch over the steady seconds per epoch);
- **extrapolation** to 90% kNN: where the run reached 90%, the measured time; otherwise the
  time of ``target_epochs`` epochs of ``epoch_images`` images (what the reference needs for
  90%: 500 epochs of CIFAR-10's 50,000 for the best public single-file SimCLR baseline, 1 h
  39 min on an A100) at the run's steady speed: the images of one of its epochs over the
  median seconds of training steps of its epochs after the first (the first compiles and warms
  up; with one epoch, that epoch), so that a run on a subset or of capped epochs extrapolates
  too. This assumes our recipe needs as many epochs as the reference's, which a run of minutes
  cannot show: it is a statement of speed, not of sample efficiency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

KNN_GOAL = 90.0
STATUSES = ("ok", "fail", "n/a")


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def methods(path: Path) -> list[dict[str, Any]]:
    """The rows of ``methods.jsonl``, the last row of each method and backbone (a pair tried
    again after CUDA was lost has two)."""
    if not path.is_file():
        return []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["method"], row["backbone"]] = row
    return list(rows.values())


def _print_methods(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':<14}{'backbone':<11}{'status':<7}{'img/s':>8}{'GiB':>7}{'s':>6}  error")
    for row in rows:
        rate = f"{row['images_per_second']:.0f}" if "images_per_second" in row else "-"
        memory = f"{row['peak_memory_gib']:.1f}" if "peak_memory_gib" in row else "-"
        print(
            f"{row['method']:<14}{row['backbone']:<11}{row['status']:<7}{rate:>8}{memory:>7}"
            f"{row['seconds']:>6.0f}  {row.get('error', '')[:110]}"
        )
    counts = {status: sum(row["status"] == status for row in rows) for status in STATUSES}
    print(", ".join(f"{count} {status}" for status, count in counts.items()))


def _print_branches(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        print(f"{row['branch']:<15}{row['status']:<6}{row['detail']}")


def speed(bench: Path) -> list[dict[str, Any]]:
    """One row per bench file: the method, compiled or not, and its figures."""
    rows = []
    for path in sorted(bench.glob("*.json")):
        result = json.loads(path.read_text())
        rows.append(
            {
                "name": path.stem,
                "plugin": result["settings"]["plugin"],
                "compile": result["compile"],
                "compile_seconds": result.get("compile_seconds"),
                "precision": result["precision"],
                "batch_size": result["settings"]["batch_size"],
                "views_per_second": result["sslplug_views"]["images_per_second"],
                "model_images_per_second": result["sslplug_model"]["images_per_second"],
                "step_images_per_second": result["sslplug_step"]["images_per_second"],
                "step_data_wait_share": result["sslplug_step"]["data_wait_share"],
                "step_tflops_per_second": result["sslplug_step"]["tflops_per_second"],
                "baseline_step_images_per_second": result.get("baseline_step", {}).get(
                    "images_per_second"
                ),
            }
        )
    eager = {row["plugin"]: row for row in rows if not row["compile"]}
    for row in rows:
        if row["compile"] and row["plugin"] in eager:
            before = eager[row["plugin"]]["step_images_per_second"]
            row["compile_speedup"] = row["step_images_per_second"] / before
    return rows


def fixed_time(
    summary: dict[str, Any],
    images: int,
    target_epochs: int,
    epoch_images: int,
    baseline_minutes: float,
) -> dict[str, Any]:
    """Epochs done, the kNN curve against time, and the time to 90% kNN."""
    curve = summary["knn_history"]
    seconds = [point.get("train_seconds") for point in curve]
    report: dict[str, Any] = {
        "epochs": summary["epochs"],
        "epochs_planned": summary["epochs_planned"],
        "stopped_by_time_limit": summary["stopped_by_time_limit"],
        "precision": summary["precision"],
        "compile": summary["compile"],
        "knn_random_init": summary["knn_top1_random_init"],
        "knn_curve": curve,
        "data_wait_share_median": summary["data_wait_share_median"],
        "images_per_second_median": summary["images_per_second_median"],
    }
    if not curve or None in seconds:
        return report
    per_epoch = [b - a for a, b in zip([0.0, *seconds], seconds)]
    steady = statistics.median(per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]
    report["seconds_per_epoch_first"] = per_epoch[0]
    report["seconds_per_epoch_steady"] = steady
    rate = report["steady_images_per_second"] = images / steady
    reached = next((point for point in curve if point["top1"] >= KNN_GOAL), None)
    if reached is not None:
        report["minutes_to_90_measured"] = reached["train_seconds"] / 60
    else:
        report["minutes_to_90_extrapolated"] = target_epochs * epoch_images / rate / 60
        report["extrapolation"] = (
            f"{target_epochs} epochs of {epoch_images} images (the reference's to "
            f"{KNN_GOAL:.0f}% kNN) at {rate:.0f} img/s, the run's speed in its epochs after the "
            f"first; assumes this recipe needs as many epochs as the reference"
        )
    report["baseline_minutes_to_90"] = baseline_minutes
    return report


def _print_speed(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'method':<18}{'views/s':>10}{'model img/s':>13}{'step img/s':>12}"
        f"{'data wait':>11}{'compile s':>11}{'speed-up':>10}"
    )
    for row in rows:
        compiled = f"{row['compile_seconds']:.0f}" if row["compile_seconds"] else "-"
        speedup = f"{row['compile_speedup']:.2f}x" if "compile_speedup" in row else "-"
        print(
            f"{row['name']:<18}{row['views_per_second']:>10.0f}"
            f"{row['model_images_per_second']:>13.0f}{row['step_images_per_second']:>12.0f}"
            f"{100 * row['step_data_wait_share']:>10.1f}%{compiled:>11}{speedup:>10}"
        )


def _print_run(run: dict[str, Any]) -> None:
    stop = "stopped by train.max_minutes" if run["stopped_by_time_limit"] else "all epochs done"
    print(
        f"epochs done: {run['epochs']} of {run['epochs_planned']} ({stop}); "
        f"{run['precision']}, compile {'on' if run['compile'] else 'off'}; "
        f"kNN of the random initialisation {run['knn_random_init']:.2f}%"
    )
    print(f"{'epoch':>6}{'kNN top-1':>11}{'train s':>10}{'wall s':>10}")
    for point in run["knn_curve"]:
        print(
            f"{point['epoch']:>6}{point['top1']:>10.2f}%{point.get('train_seconds', 0):>10.1f}"
            f"{point.get('wall_seconds', 0):>10.1f}"
        )
    wait = run["data_wait_share_median"]
    print(
        f"median over epochs: {run['images_per_second_median']:.0f} img/s, data wait "
        f"{100 * wait:.1f}% of step time"
        if wait is not None
        else "no epoch finished"
    )
    if "seconds_per_epoch_steady" in run:
        steady = run["seconds_per_epoch_steady"]
        print(
            f"seconds of training steps per epoch: first {run['seconds_per_epoch_first']:.1f}, "
            f"then {steady:.2f} ({run['steady_images_per_second']:.0f} img/s)"
        )
    if "minutes_to_90_measured" in run:
        print(f"90% kNN reached after {run['minutes_to_90_measured']:.1f} minutes of training")
    elif "minutes_to_90_extrapolated" in run:
        print(
            f"time to 90% kNN, extrapolated: {run['minutes_to_90_extrapolated']:.1f} minutes "
            f"({run['extrapolation']}); the reference: {run['baseline_minutes_to_90']:.0f} "
            f"minutes on an A100"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the OUT folder of benchmarks/gpu.sh")
    parser.add_argument("--target-epochs", type=int, default=500)
    parser.add_argument("--epoch-images", type=int, default=50_000)
    parser.add_argument("--baseline-minutes", type=float, default=99.0)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    device = args.out / "device.txt"
    if device.is_file():
        report["device"] = device.read_text().strip()
    pairs = methods(args.out / "methods.jsonl")
    if pairs:
        report["methods"] = pairs
        how = _load(args.out / "methods_settings.json")
        if how:
            report["methods_settings"] = how
        print(
            "== every method with every backbone"
            + (
                f": {how['steps']} steps timed after {how['warmup']}, batch "
                f"{how['batch_size']}, {how['precision']} on {how['device']}"
                if how
                else ""
            )
        )
        _print_methods(pairs)
    branches = _load(args.out / "branches.json")
    if branches:
        report["branches"] = branches
        print("== the branches only CUDA takes")
        _print_branches(branches)
    rows = speed(args.out / "bench")
    if rows:
        report["speed"] = rows
        print("== (a, b) views/s, training img/s and data wait, without and with compile")
        _print_speed(rows)
    summary = _load(args.out / "run" / "summary.json")
    if summary is not None:
        settings = tomllib.loads((args.out / "run" / "settings.toml").read_text())
        images = summary["steps"] // max(1, summary["epochs"]) * settings["train"]["batch_size"]
        report["fixed_time_run"] = fixed_time(
            summary, images, args.target_epochs, args.epoch_images, args.baseline_minutes
        )
        print("== (c) the fixed-time run: kNN against time")
        _print_run(report["fixed_time_run"])
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"all figures in {args.out / 'report.json'}")
    return 0 if pairs or branches or rows or summary is not None else 1


if __name__ == "__main__":
    sys.exit(main())
