"""Fine-tuning: the whole encoder plus a linear classifier, trained on a few labelled images.

The classifier reads ``encoder.features`` (the features evaluation uses), so methods whose
backbone sees tiles or patches are fine-tuned through the same path they are evaluated by.
Training uses the light augmentation of the pretext tasks (random resized crop with scale
0.35-1 and a horizontal flip, batched on the device), AdamW with a cosine schedule, and a
fixed number of steps whatever the number of labels, so that 1% and 10% of the labels cost the
same. Starting the same training from the random initialisation of the same run gives
supervised training from scratch on the same labels: the baseline that shows what
pre-training is worth.
"""

from __future__ import annotations

import copy
import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslplug.augment import crop_flip_recipe, normalize, to_float
from sslplug.components import Encoder
from sslplug.data import DataSet, Loader, Split

__all__ = ["FinetuneSettings", "finetune", "take"]


@attrs.frozen
class FinetuneSettings:
    """The fine-tuning recipe (the same for pre-trained and randomly initialised encoders)."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_scale: tuple[float, float] = (0.35, 1.0)
    seed: int = 0


class _Classifier(nn.Module):
    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder.features(images))


def take(split: Split, index: Tensor) -> Split:
    """The images ``index`` of ``split`` as an in-memory split (decoding them if streamed)."""
    index = index.cpu()
    if split.images is not None:
        return Split(labels=split.labels[index], images=split.images[index])
    source = split.source
    assert source is not None  # a split without images is streamed
    kept = [x for x in (source[i] for i in index.tolist()) if x is not None]
    return Split(
        labels=torch.tensor([lab for _, lab in kept], dtype=torch.long),
        images=torch.stack([img for img, _ in kept]),
    )


@torch.no_grad()
def _accuracy(model: nn.Module, split: Split, device: torch.device) -> float:
    model.eval()
    correct = 0
    for images, labels in Loader(split, 512, device, shuffle=False, drop_last=False).epoch(0):
        correct += (model(normalize(to_float(images))).argmax(1) == labels).sum().item()
    return 100.0 * correct / len(split)


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
    augment = crop_flip_recipe(data.image_size, settings.crop_scale).to(device)
    batch = min(settings.batch_size, len(train))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
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
