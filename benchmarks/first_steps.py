"""The loss of every built-in method's first three steps on the default data, for proving that a
refactor changed no result.

Each method trains one epoch of three steps (seed 0, one torch thread, the loss logged at every
step, no monitors), MAE, I-JEPA, iBOT and DINOv2 on ``vit_micro``, distillation from a
teacher of random weights; the losses are written as ``repr`` strings
to a JSON file, so that two files compare to the last digit::

    OMP_NUM_THREADS=1 python benchmarks/first_steps.py before.json      # on the old code
    OMP_NUM_THREADS=1 python benchmarks/first_steps.py after.json       # on the new code
    python -c "import json; print(json.load(open('before.json')) == json.load(open('after.json')))"

Pass method names after the file to record only those.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from sslplug_methods import METHODS

import sslplug
from sslplug.config import load_config
from sslplug.engine import train
from sslplug.plugins import PluginRegistry

VIT_ONLY = {"mae", "ijepa", "ibot", "dinov2"}
# distillation's default teacher is downloaded: a teacher of random weights offline
TEACHER = {"distill": "distill.teacher=random:resnet18"}


def first_losses(method: str, steps: int = 3) -> list[str]:
    """The loss of ``method``'s first ``steps`` steps, as ``repr`` strings."""
    registry = PluginRegistry()
    registry.load_entry_points()
    losses: list[str] = []

    @sslplug.hookimpl
    def sslplug_step_end(metrics: dict[str, float]) -> None:
        losses.append(repr(metrics["loss"]))

    listener = types.ModuleType("first_steps_listener")
    listener.sslplug_step_end = sslplug_step_end  # type: ignore[attr-defined]
    registry.register(listener, "first_steps_listener")
    with tempfile.TemporaryDirectory() as folder:
        settings = [
            f"components.plugin={method}",
            "train.epochs=1",
            f"train.max_steps_per_epoch={steps}",
            "train.log_every=1",
            "train.seed=0",
            f"train.out={Path(folder) / 'run'}",
            "train.disable=['progress', 'knn', 'view_grid', 'tensorboard']",
        ]
        if method in VIT_ONLY:
            settings.append("model.backbone=vit_micro")
        if method in TEACHER:
            settings.append(TEACHER[method])
        train(load_config(None, settings, registry.settings_classes()), registry)
    return losses


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python benchmarks/first_steps.py OUT.json [METHOD ...]")
    torch.set_num_threads(1)
    recorded = {method: first_losses(method) for method in argv[1:] or METHODS}
    Path(argv[0]).write_text(json.dumps(recorded, indent=1) + "\n")
    for method, losses in recorded.items():
        print(method, *losses)


if __name__ == "__main__":
    main(sys.argv[1:])
