"""Fine-tuning: the whole encoder plus a linear classifier, trained on a few labelled images.

The classifier reads ``encoder.features`` (the features evaluation uses), so methods whose
backbone sees tiles or patches are fine-tuned through the same path they are evaluated by.

The recipe is linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): the classifier is
first fitted on the frozen features of the labelled images (``sslplug.evaluate.fit_probe``,
its L2 penalty chosen on a held-out fifth), so fine-tuning starts from the frozen probe's
answer instead of a random head whose first gradients disturb the pre-trained features; then
the whole network trains with the encoder at a tenth of the head's learning rate
(``backbone_lr_scale``), as the semi-supervised protocols of SimCLR and BYOL fine-tune the
backbone gently. 1,000 steps, not the 300 of the first recipe: with 10% of CIFAR-10's labels
300 steps left the fine-tuned network below the frozen probe it started from. Training uses the
light augmentation of the pretext tasks (random resized
crop with scale 0.35-1 and a horizontal flip, batched on the device), AdamW with a cosine
schedule, and a fixed number of steps whatever the number of labels, so that 1% and 10% of the
labels cost the same. Starting the same training from the random initialisation of the same
run gives supervised training from scratch on the same labels: the baseline that shows what
pre-training is worth.

Layer-wise learning-rate decay (``layer_decay``, Clark et al. 2020 for ELECTRA, the standard
for fine-tuning ViTs since BEiT, Bao et al. 2022, and MAE, He et al. 2022, whose official
commands use 0.65 for ViT-B): the backbone's layers, from the output back to the input, learn
at ``layer_decay`` times the rate of the layer above, so the first layers, which pre-training
made most general, move least. ``backbone_layers`` says what a layer is: the embeddings and
each transformer block of a ViT, the stem and each stage of a ResNet, each convolution of the
small backbone. 1.0 (the default) turns it off; ResNets may use it too.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslplug.augment import crop_flip_recipe, normalize, to_float
from sslplug.components import Encoder
from sslplug.data import DataSet, Loader, Split
from sslplug.evaluate import fit_probe
from sslplug.nn import backbone_layers

__all__ = ["FinetuneSettings", "backbone_layers", "finetune", "layer_decay_groups", "take"]


@attrs.frozen
class FinetuneSettings:
    """The fine-tuning recipe (the same for pre-trained and randomly initialised encoders)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_scale: tuple[float, float] = (0.35, 1.0)
    seed: int = 0
    backbone_lr_scale: float = 0.1
    probe_first: bool = True
    layer_decay: float = 1.0


class _Classifier(nn.Module):
    """The encoder, a fixed standardisation of its features (the probe's, or none), and a
    linear head."""

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        self.register_buffer("mean", torch.zeros(1, encoder.feature_dim))
        self.register_buffer("std", torch.ones(1, encoder.feature_dim))

    def forward(self, images: Tensor) -> Tensor:
        return self.head((self.encoder.features(images).float() - self.mean) / self.std)


def layer_decay_groups(encoder: Encoder, lr: float, decay: float) -> list[dict[str, Any]]:
    """Optimiser groups for ``encoder``: layer ``i`` of ``L`` backbone layers at
    ``lr * decay ** (L - i)``, every other parameter (final norm, heads) at ``lr``."""
    layers = backbone_layers(encoder.backbone)
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i, params in enumerate(layers):
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": lr * decay ** (len(layers) - i)})
    rest = [p for p in encoder.parameters() if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr})
    return groups


def take(split: Split, index: Tensor) -> Split:
    """The images ``index`` of ``split`` as an in-memory split of squares (decoding them if
    streamed)."""
    return split.squares(index)


@torch.no_grad()
def _accuracy(model: nn.Module, split: Split, device: torch.device) -> float:
    model.eval()
    correct = 0
    for images, labels in Loader(split, 512, device, shuffle=False, drop_last=False).epoch(0):
        correct += (model(normalize(to_float(images))).argmax(1) == labels).sum().item()
    return 100.0 * correct / len(split)


@torch.no_grad()
def _probe_head(
    model: _Classifier, images: Tensor, labels: Tensor, num_classes: int, seed: int
) -> None:
    """Set the classifier to the linear probe of the frozen, un-augmented features."""
    model.eval()
    features = torch.cat(
        [model.encoder.features(normalize(to_float(chunk))).float() for chunk in images.split(512)]
    )
    with torch.enable_grad():
        probe = fit_probe(features, labels, num_classes, seed=seed)
    model.head.load_state_dict(probe.head.state_dict())
    model.mean.copy_(probe.mean)
    model.std.copy_(probe.std)


def finetune(
    encoder: Encoder,
    data: DataSet,
    labelled: Tensor,
    device: torch.device,
    settings: FinetuneSettings | None = None,
) -> float:
    """Fine-tune a copy of ``encoder`` with a new linear head on the train images ``labelled``
    (indices); return top-1 accuracy (percent) on the test split. ``encoder`` is not changed."""
    settings = settings or FinetuneSettings()
    torch.manual_seed(settings.seed)
    model = _Classifier(copy.deepcopy(encoder), data.num_classes).to(device)
    train = take(data.train, labelled)
    assert train.images is not None  # take() returns an in-memory split
    images, labels = train.images.to(device), train.labels.to(device)
    if settings.probe_first:
        _probe_head(model, images, labels, data.num_classes, settings.seed)
    augment = crop_flip_recipe(data.image_size, settings.crop_scale).to(device)
    batch = min(settings.batch_size, len(train))
    optimizer = torch.optim.AdamW(
        [
            *layer_decay_groups(
                model.encoder, settings.lr * settings.backbone_lr_scale, settings.layer_decay
            ),
            {"params": model.head.parameters(), "lr": settings.lr},
        ],
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps))
    )
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(settings.steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        index, order = order[:batch].to(device), order[batch:]
        with torch.no_grad():
            views = augment(to_float(images[index]))
        loss = F.cross_entropy(model(views), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert data.test is not None, "finetune needs a test split"
    return _accuracy(model, data.test, device)
