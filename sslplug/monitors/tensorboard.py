"""TensorBoard: the training scalars, evaluation results, the view grid and, at the end, the
features of test images for the embedding projector, under ``RUN/tensorboard/``.

Its settings are the ``[tensorboard]`` section, which it declares as any plugin does
(``eval.embedding_samples`` is the old name of ``tensorboard.embedding_samples``).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from sslplug.context import RunContext
from sslplug.evaluate import extract_features
from sslplug.hookspecs import hookimpl
from sslplug.monitors.view_grid import FILENAME as VIEWS_FILE
from sslplug.validate import non_negative

__all__ = ["TensorBoardLogger", "TensorBoardSettings"]


@attrs.define
class TensorBoardSettings:
    """At the end of a run, the features of ``embedding_samples`` test images (0: none), with
    their labels and thumbnails, go to TensorBoard's embedding projector."""

    embedding_samples: int = attrs.field(default=1000, validator=non_negative)


def _tag(metric: str) -> str:
    return "knn/top1" if metric == "knn_top1" else f"eval/{metric}"


class TensorBoardLogger:
    """One ``SummaryWriter`` a run, opened at its start and closed at its end."""

    def __init__(self) -> None:
        self.writer: Any = None

    @hookimpl
    def sslplug_settings(self) -> type:
        return TensorBoardSettings

    @hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = run.progress.step
        self.writer = SummaryWriter(str(run.out_dir / "tensorboard"), purge_step=step or None)
        if step == 0:
            for key, value in run.baseline.items():
                self.writer.add_scalar(_tag(key), value, 0)
            views = run.out_dir / VIEWS_FILE
            if views.is_file():
                import numpy as np
                from PIL import Image

                picture = np.asarray(Image.open(views).convert("RGB"))
                self.writer.add_image("views", picture, 0, dataformats="HWC")

    @hookimpl
    def sslplug_step_end(self, run: RunContext, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    @hookimpl
    def sslplug_epoch_end(self, run: RunContext, epoch: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key in ("loss", "images_per_second", "data_wait_share"):
            self.writer.add_scalar(f"epoch/{key}", metrics[key], epoch)
        standard = {"epoch", "loss", "images_per_second", "data_wait_share"}
        for key, value in metrics.items():
            if key not in standard:
                self.writer.add_scalar(_tag(key), value, run.progress.step)

    @hookimpl
    def sslplug_run_end(
        self, run: RunContext, summary: dict[str, Any], error: BaseException | None
    ) -> None:
        if self.writer is None:
            return
        if error is None:
            self._embeddings(run)
            for key in ("knn_top1", "knn_top1_random_init"):
                if summary.get(key) is not None:
                    self.writer.add_scalar(f"summary/{key}", summary[key], run.progress.step)
        self.writer.close()
        self.writer = None

    def _embeddings(self, run: RunContext) -> None:
        """Test-set features with their labels and thumbnails, for the projector."""
        data, parts = run.data, run.parts
        count = run.config.settings_of("tensorboard", TensorBoardSettings).embedding_samples
        if not count or data is None or data.test is None or not data.test.labelled:
            return
        if parts is None:
            return
        test = data.test
        index = torch.linspace(0, len(test) - 1, min(count, len(test))).long().unique()
        sample = test.squares(index)
        features, labels = extract_features(
            parts.encoder, sample, torch.device(run.device), workers=0
        )
        names = data.classes
        thumbnails = sample.images.float() / 255 if sample.images is not None else None
        self.writer.add_embedding(
            features.cpu(),
            metadata=[names[i] if names else str(i) for i in labels.tolist()],
            label_img=thumbnails,
            global_step=run.progress.step,
            tag="test_features",
        )
