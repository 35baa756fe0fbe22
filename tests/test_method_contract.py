"""The contract every built-in method keeps, one parametrized test over all of them: it trains
two steps, resumes bit for bit, exports its backbone, and mixes with another plugin's
augmentation."""

from __future__ import annotations

import math

import pytest
import torch
from sslplug_methods import METHODS

from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.errors import ComponentMismatchError

from .harness import assert_same_checkpoints, stop_and_resume, train_pinned

# Two epochs of one step each, on the default data, with narrow heads where a method's recipe
# is wide, and nothing measured but the loss.
SHORT = [
    "train.batch_size=16",
    "train.epochs=2",
    "train.max_steps_per_epoch=1",
    "train.log_every=1",
    "train.disable=['progress','knn','view_grid','tensorboard']",
    "data.workers=0",
    "knn.baseline=false",
    "health.baseline=false",
    "knn.every=0",
    "health.every=0",
    "tensorboard.embedding_samples=0",
    "health.samples=64",
]
NARROW = {
    "byol": ["byol.projector_hidden_dim=64", "byol.predictor_hidden_dim=64"],
    "moco_v3": ["moco_v3.projector_hidden_dim=64", "moco_v3.predictor_hidden_dim=64"],
    "nnclr": [
        "nnclr.projector_hidden_dim=64", "nnclr.predictor_hidden_dim=64",
        "nnclr.support_set_size=64",
    ],
    "moco_v2": ["moco_v2.queue_size=64"],
    "dino": ["dino.out_dim=256", "dino.local_crops_number=2"],
    "swav": ["swav.prototypes=64", "swav.local_crops=2"],
    "mae": ["model.backbone=vit_micro"],
    "ijepa": ["model.backbone=vit_micro"],
    # a teacher of random weights: the default one is downloaded, and tests run offline
    "distill": ["distill.teacher=random:small", "distill.head_hidden_dim=64"],
    "ibot": ["model.backbone=vit_micro", "ibot.out_dim=256", "ibot.local_crops_number=2"],
    "dinov2": [
        "model.backbone=vit_micro", "model.registers=2", "dinov2.out_dim=256",
        "dinov2.local_crops_number=2", "dinov2.centering=sinkhorn_knopp",
    ],
}  # fmt: skip
# a foreign augmentation each method accepts: the views it needs come from another plugin
FOREIGN: dict[str, str | None] = {
    "byol": "simclr", "simclr": "byol", "barlow_twins": "simclr", "rotnet": "simclr",
    "jigsaw": "simclr", "cpc": None, "moco_v2": "byol", "moco_v3": "simclr",
    "swav": "dino", "dino": "swav", "vicreg": "byol", "nnclr": "simclr", "simsiam": "byol",
    "mae": "simclr", "ijepa": "simclr", "distill": "byol", "ibot": "dino", "dinov2": "dino",
}  # fmt: skip


def _settings(method: str) -> list[str]:
    return [*SHORT, f"components.plugin={method}", *NARROW.get(method, [])]


@pytest.mark.slow  # four short runs per method
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_resumes_exports_and_mixes(method, tmp_path):
    settings = _settings(method)
    straight = train_pinned(tmp_path / "straight", settings)
    assert (straight["epochs"], straight["steps"]) == (2, 2)
    assert math.isfinite(straight["final_loss"])

    resumed = stop_and_resume(tmp_path / "resumed", settings, stop_after=1)
    assert resumed["steps"] == 2
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "resumed")

    exported = tmp_path / "backbone.pt"
    assert main(["export", str(tmp_path / "straight"), str(exported)]) == 0
    backbone = torch.load(exported, weights_only=True)
    encoder = load_checkpoint(tmp_path / "straight")["encoder"]
    inner = "backbone.vit." if any(k.startswith("backbone.vit.") for k in encoder) else "backbone."
    for key, value in backbone.items():  # a ViT is exported as the timm model it wraps
        assert torch.equal(value, encoder[inner + key]), key

    if FOREIGN[method] is None:  # its views need pipelines only its own augmentation gives
        with pytest.raises(ComponentMismatchError, match=r"requires image_then_patch_pipelines"):
            train_pinned(tmp_path / "mixed", [*settings, "components.augmentation=simclr"])
        return

    mixed = train_pinned(
        tmp_path / "mixed",
        [*settings, f"components.augmentation={FOREIGN[method]}", "train.epochs=1"],
    )
    assert mixed["components"]["augmentation"] == FOREIGN[method]
    assert math.isfinite(mixed["final_loss"])
