"""What users run after pre-training: frozen evaluation and fine-tuning with few labels.

``frozen_evaluation`` extracts ``encoder.features`` of the train and test splits once, then, for
every label budget, scores weighted kNN (the labelled subset as memory bank) and the linear
probe. ``finetune_evaluation`` fine-tunes on each budget. Both return rows (plain dicts) that
``record`` appends to the run's ``summary.json`` under ``"evaluations"`` and writes to its
TensorBoard log, and that ``format_table`` prints.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from sslplug.checkpoint import write_failure
from sslplug.components import Encoder
from sslplug.data import DataSet
from sslplug.errors import DataError, OutputError
from sslplug.evaluate import LabelBudget, extract_features, knn_predict, label_subset, linear_probe
from sslplug.finetune import FinetuneSettings, finetune
from sslplug.outputs import read_summary, write_atomically

__all__ = [
    "finetune_evaluation",
    "format_health",
    "format_table",
    "frozen_evaluation",
    "health_evaluation",
    "record",
]


def _check_labelled(data: DataSet) -> None:
    if data.test is None or not data.test.labelled or not data.train.labelled:
        raise DataError(
            f"data {data.name!r} has no labelled train and test splits; evaluation needs labels "
            f"(an image folder with class subfolders, or a built-in data set)"
        )


def frozen_evaluation(
    encoder: Encoder,
    data: DataSet,
    budgets: Sequence[LabelBudget],
    device: torch.device,
    init: str,
    seed: int = 0,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
) -> list[dict[str, Any]]:
    """kNN and linear-probe top-1 (percent) of ``encoder`` for every label budget."""
    _check_labelled(data)
    assert data.test is not None  # checked by _check_labelled
    train_x, train_y = extract_features(encoder, data.train, device)
    test_x, test_y = extract_features(encoder, data.test, device)
    rows = []
    for budget in budgets:
        start = time.perf_counter()
        index = label_subset(train_y, budget, data.num_classes, seed).to(train_x.device)
        x, y = train_x[index], train_y[index]
        knn = knn_predict(x, y, test_x, data.num_classes, knn_k, knn_temperature)
        probe, weight_decay = linear_probe(x, y, test_x, test_y, data.num_classes, seed=seed)
        rows.append(
            {
                "kind": "frozen",
                "data": data.name,
                "labels": budget.name,
                "labelled_images": len(index),
                "init": init,
                "seed": seed,
                "knn_top1": 100.0 * (knn == test_y).float().mean().item(),
                "linear_top1": probe,
                "linear_weight_decay": weight_decay,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def health_evaluation(
    encoder: Encoder,
    views: Any,
    data: DataSet,
    device: torch.device,
    init: str,
    samples: int = 1024,
    seed: int = 0,
) -> dict[str, Any]:
    """The label-free measures of ``encoder`` (``sslplug.health``) on the fixed sample of
    training images a run with ``seed`` measures, labelled data or not."""
    from sslplug.monitors.health import measure_health, sample_images

    start = time.perf_counter()
    images = sample_images(data.train, samples, seed)
    measures = measure_health(encoder, views, images, device)
    return {
        "kind": "health",
        "data": data.name,
        "init": init,
        "images": len(images),
        **measures,
        "seconds": time.perf_counter() - start,
    }


def format_health(rows: Sequence[dict[str, Any]]) -> str:
    """Health rows as an aligned text table."""
    names = ("rank_features", "spread_features", "rank_projections", "spread_projections",
             "alignment", "uniformity")
    used = [n for n in names if any(n in row for row in rows)]
    table = [["init", "images", *used]]
    for row in rows:
        table.append([row["init"], str(row["images"]),
                      *(f"{row[n]:.3f}" if n in row else "-" for n in used)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in table
    )


def finetune_evaluation(
    encoder: Encoder,
    data: DataSet,
    budgets: Sequence[LabelBudget],
    device: torch.device,
    init: str,
    settings: FinetuneSettings | None = None,
) -> list[dict[str, Any]]:
    """Test top-1 (percent) after fine-tuning ``encoder`` on each label budget."""
    _check_labelled(data)
    settings = settings or FinetuneSettings()
    if init != "pre-trained":  # from scratch: nothing to start from or to preserve
        settings = attrs.evolve(settings, backbone_lr_scale=1.0, probe_first=False, layer_decay=1.0)
    rows = []
    for budget in budgets:
        start = time.perf_counter()
        index = label_subset(data.train.labels, budget, data.num_classes, settings.seed)
        top1 = finetune(encoder, data, index, device, settings)
        rows.append(
            {
                "kind": "finetune",
                "data": data.name,
                "labels": budget.name,
                "labelled_images": len(index),
                "init": init,
                "seed": settings.seed,
                "finetune_top1": top1,
                "steps": settings.steps,
                "batch_size": settings.batch_size,
                "lr": settings.lr,
                "backbone_lr_scale": settings.backbone_lr_scale,
                "layer_decay": settings.layer_decay,
                "probe_first": settings.probe_first,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def record(run_dir: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` to ``run_dir/summary.json`` (under ``"evaluations"``) and TensorBoard.

    ``summary.json`` is replaced atomically, so a failure leaves it as it was. Raises
    ``OutputError`` saying what could not be written and why: ``summary.json`` (then nothing is
    recorded), or the TensorBoard log (then ``summary.json`` holds the rows).
    """
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8, or not ours
        raise OutputError(
            f"cannot add the results to {str(path)!r}: {write_failure(exc)}; move the file "
            f"aside (a new one is written then) and run again"
        ) from None
    summary.setdefault("evaluations", []).extend(rows)
    write_atomically({path: (json.dumps(summary, indent=2) + "\n").encode()})
    log = run_dir / "tensorboard"
    try:
        log.mkdir(parents=True, exist_ok=True)
        # try a file first: SummaryWriter fails in a thread of its own, with a traceback
        with tempfile.TemporaryFile(dir=log):
            pass
        with SummaryWriter(str(log)) as writer:
            for row in rows:
                for key in ("knn_top1", "linear_top1", "finetune_top1"):
                    if key in row:
                        tag = f"eval/{key}/{row['labels'].replace('/', '_per_')}/{row['init']}"
                        writer.add_scalar(tag, row[key], summary.get("steps", 0))
    except OSError as exc:
        raise OutputError(
            f"the results were added to {str(path)!r}, but not to the TensorBoard log "
            f"{str(log)!r}: {write_failure(exc)}; make it writable to log the next ones there"
        ) from None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as an aligned text table: one line per label budget and initialisation."""
    columns = [
        ("labels", "labels", "{}"),
        ("images", "labelled_images", "{}"),
        ("init", "init", "{}"),
        ("kNN top-1", "knn_top1", "{:.2f}%"),
        ("linear top-1", "linear_top1", "{:.2f}%"),
        ("probe L2", "linear_weight_decay", "{:g}"),
        ("fine-tuned top-1", "finetune_top1", "{:.2f}%"),
    ]
    used = [c for c in columns if any(c[1] in row for row in rows)]
    table = [[title for title, _, _ in used]]
    for row in rows:
        table.append([fmt.format(row[key]) if key in row else "-" for _, key, fmt in used])
    widths = [max(len(line[i]) for line in table) for i in range(len(used))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        ).rstrip()
        for line in table
    )
