"""The quality benchmark: every method pre-trained on the same data and budget, then measured
with few labels.

For each method (one run folder each under ``--out``):

1. pre-train with ``sslplug run`` (skipped when the folder holds a finished run, resumed when it
   holds an interrupted one);
2. evaluate, pre-trained and at the run's random initialisation: weighted kNN and the linear
   probe with 1%, 10% and all of the labels, and fine-tuning with 1% and 10%. Fine-tuning from
   the random initialisation is supervised training from scratch on the same labels. Results go
   to ``quality.json`` in the run folder, written after each part, so an interrupted benchmark
   continues where it stopped;
3. report: ``quality.md`` (the table), ``knn_over_epochs.png`` and ``label_fraction.png``.

Every stage skips what is already done, so the benchmark can be split across sessions::

    python benchmarks/quality.py --data ../shared/data/cifar10 --out bench/quality --methods byol
    python benchmarks/quality.py --data ../shared/data/cifar10 --out bench/quality   # the rest

The plots need matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from sslplug.data import load_data
from sslplug.downstream import finetune_evaluation, frozen_evaluation, record
from sslplug.engine import resolve_device
from sslplug.evaluate import parse_labels
from sslplug.finetune import FinetuneSettings
from sslplug.plugins import PluginRegistry
from sslplug.pretrained import build_encoder, load_run

METHODS = (
    "rotnet", "jigsaw", "cpc", "simclr", "byol", "barlow_twins",
    "moco_v2", "moco_v3", "swav", "dino", "vicreg", "nnclr", "simsiam", "mae", "ijepa",
)  # fmt: skip
PARTS = ("frozen", "finetune")
FROZEN_BUDGETS = ("1%", "10%", "all")
FINETUNE_BUDGETS = ("1%", "10%")
INITS = ("pre-trained", "random init")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def pretrain(method: str, args: argparse.Namespace) -> Path:
    run_dir = args.out / method
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("epochs") == args.epochs:
        _log(f"{method}: pre-trained run found in {run_dir}")
        return run_dir
    command = [sys.executable, "-m", "sslplug", "run", "--no-progress"]
    if (run_dir / "last.pt").is_file():
        command += ["--resume", str(run_dir), "--epochs", str(args.epochs)]
        _log(f"{method}: resuming {run_dir}")
    else:
        command += [
            "--plugin", method, "--data", str(args.data), "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--out", str(run_dir),
        ]  # fmt: skip
        if args.backbone:
            command += ["--backbone", args.backbone]
        for assignment in args.set:
            command += ["--set", assignment]
        _log(f"{method}: pre-training: {' '.join(command[2:])}")
    subprocess.run(command, check=True)
    return run_dir


def _save(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def _encoder_key(encoder: Any) -> str:
    """Identifies what an evaluation measures: the features function and the backbone weights."""
    digest = hashlib.sha1(type(encoder).features.__qualname__.encode())
    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _measured_elsewhere(
    out: Path, method: str, part: str, key: str, args: Any
) -> tuple[str, Any] | None:
    """Rows already measured for an identical encoder (the same random initialisation of the
    same backbone, read the same way), by another method's run."""
    for other in METHODS:
        path = out / other / "quality.json"
        if other == method or not path.is_file():
            continue
        entry = json.loads(path.read_text()).get(part)
        if (
            entry is not None
            and entry.get("encoder_key") == key
            and "shared_with" not in entry
            and _done(entry, args)
        ):
            return other, {"rows": entry["rows"], "seconds": entry["seconds"]}
    return None


def _done(entry: dict[str, Any] | None, args: Any) -> bool:
    """Whether a part's saved rows cover the label budgets asked for."""
    if entry is None:
        return False
    if entry["rows"][0]["kind"] != "frozen":
        return True
    measured = {row["labels"] for row in entry["rows"]}
    return all(b in measured for b in args.budgets)


def evaluate(method: str, run_dir: Path, data: Any, registry: PluginRegistry, args: Any) -> None:
    path = run_dir / "quality.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    device = resolve_device(args.device)
    run = load_run(run_dir, registry)
    settings = FinetuneSettings(steps=args.finetune_steps, layer_decay=args.layer_decay)
    for init in INITS:
        parts = {
            f"frozen/{init}": lambda encoder, init=init: frozen_evaluation(
                encoder, data, [parse_labels(b) for b in args.budgets], device, init
            ),
            f"finetune/{init}": lambda encoder, init=init: finetune_evaluation(
                encoder, data, [parse_labels(b) for b in FINETUNE_BUDGETS], device, init, settings
            ),
        }
        for part, measure in parts.items():
            if part.split("/")[0] not in args.parts or _done(results.get(part), args):
                continue
            encoder = build_encoder(
                run, registry, data.image_size, data.num_classes, device, init == "pre-trained"
            )
            key = _encoder_key(encoder)
            shared = _measured_elsewhere(args.out, method, part, key, args)
            if shared is not None:
                _log(f"{method}: {part}: the same encoder as {shared[0]}'s, measured there")
                results[part] = {**shared[1], "shared_with": shared[0]}
            else:
                _log(f"{method}: {part}")
                start = time.perf_counter()
                rows = measure(encoder)
                results[part] = {"rows": rows, "seconds": time.perf_counter() - start}
            results[part]["encoder_key"] = key
            record(run_dir, rows)
            _save(path, results)


def _rows(out: Path, methods: list[str]) -> dict[str, dict[str, Any]]:
    table = {}
    for method in methods:
        quality, summary = out / method / "quality.json", out / method / "summary.json"
        if not quality.is_file():
            continue
        results = json.loads(quality.read_text())
        table[method] = {
            "summary": json.loads(summary.read_text()),
            "rows": [row for part in results.values() for row in part["rows"]],
        }
    return table


def _value(rows: list[dict[str, Any]], kind: str, key: str, labels: str, init: str) -> str:
    for row in rows:
        if row["kind"] == kind and row["labels"] == labels and row["init"] == init and key in row:
            return f"{row[key]:.1f}"
    return "-"


def report(out: Path, methods: list[str]) -> None:
    table = _rows(out, methods)
    header = (
        "| method | init | kNN, all labels | linear 1% | linear 10% | linear, all | "
        "fine-tune 1% | fine-tune 10% |"
    )
    lines = [header, "|" + "---|" * 8]
    for method, entry in table.items():
        for init in INITS:
            label = "random init (fine-tune: from scratch)" if init == "random init" else init
            cells = [
                _value(entry["rows"], "frozen", "knn_top1", "all", init),
                *(_value(entry["rows"], "frozen", "linear_top1", b, init) for b in FROZEN_BUDGETS),
                *(
                    _value(entry["rows"], "finetune", "finetune_top1", b, init)
                    for b in FINETUNE_BUDGETS
                ),
            ]
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plots(out, table)


def _plots(out: Path, table: dict[str, dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plots (pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, entry in table.items():
        summary = entry["summary"]
        points = [(0, summary["knn_top1_random_init"])] + [
            (h["epoch"], h["top1"]) for h in summary["knn_history"]
        ]
        ax.plot(*zip(*points), marker="o", label=method)
    ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN accuracy during pre-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "knn_over_epochs.png", dpi=120)
    plt.close(fig)

    fractions = {"1%": 1.0, "10%": 10.0, "all": 100.0}
    fig, axes = plt.subplots(1, len(table), figsize=(3.2 * len(table), 3.4), sharey=True)
    axes = [axes] if len(table) == 1 else list(axes)
    for ax, (method, entry) in zip(axes, table.items()):
        for kind, key, style in (
            ("frozen", "linear_top1", "-"),
            ("finetune", "finetune_top1", "--"),
        ):
            for init, colour in zip(INITS, ("tab:blue", "tab:grey")):
                points = sorted(
                    (fractions[r["labels"]], r[key])
                    for r in entry["rows"]
                    if r["kind"] == kind and r["init"] == init and r["labels"] in fractions
                )
                if points:
                    name = "linear" if kind == "frozen" else "fine-tune"
                    marker = "o" if kind == "frozen" else "s"
                    label = f"{name}, {init}"
                    ax.plot(*zip(*points), style, marker=marker, color=colour, label=label)
        ax.set(xscale="log", title=method, xlabel="labels used (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "label_fraction.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled data: cifar10 or an image folder")
    parser.add_argument("--out", type=Path, default=Path("bench/quality"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", help="the backbone to pre-train (default: sslplug's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting passed to every pre-training run (repeatable)",
    )
    parser.add_argument("--finetune-steps", type=int, default=FinetuneSettings().steps)
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=FinetuneSettings().layer_decay,
        help="layer-wise learning-rate decay when fine-tuning (0.75 for ViTs; default off)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
        help="what to evaluate: the frozen kNN and linear probes, fine-tuning, or both",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        default=list(FROZEN_BUDGETS),
        choices=FROZEN_BUDGETS,
        help="label budgets of the frozen kNN and linear probe (default: all three)",
    )
    parser.add_argument("--stage", choices=("all", "pretrain", "evaluate", "report"), default="all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "pretrain"):
        for method in args.methods:
            pretrain(method, args)
    if args.stage in ("all", "evaluate"):
        registry = PluginRegistry()
        registry.load_entry_points()
        data = None
        for method in args.methods:
            done = args.out / method / "quality.json"
            if done.is_file():
                saved = json.loads(done.read_text())
                wanted = [f"{part}/{init}" for part in args.parts for init in INITS]
                if all(_done(saved.get(w), args) for w in wanted):
                    continue
            if data is None:
                run = load_run(args.out / method, registry)
                settings = attrs.evolve(run.config.data, name=str(args.data))
                _log(f"loading {settings.name}")
                data = load_data(settings, seed=run.config.train.seed)
            evaluate(method, args.out / method, data, registry, args)
    report(args.out, args.methods)


if __name__ == "__main__":
    main()
