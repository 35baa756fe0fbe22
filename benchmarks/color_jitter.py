"""BYOL's two views with kornia's ColorJitter against sslplug's, side by side in one process.

    python benchmarks/color_jitter.py

The profile that motivated ``sslplug.ColorJitter``: kornia's converts to HSV for saturation and
again for hue, and took about two thirds of the recipe's time on a CPU. Prints the median
images per second (two views each) of the BYOL recipe with each jitter, twice.
"""

from __future__ import annotations

import statistics
import time

import kornia.augmentation as K
import torch

from sslplug.augment import ColorJitter, byol_recipe, to_float


def _rate(pipelines: tuple[torch.nn.Module, ...], batch: torch.Tensor) -> float:
    def once() -> None:
        images = to_float(batch)
        for pipeline in pipelines:
            pipeline(images)

    for _ in range(3):
        once()
    rates = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(3):
            once()
        rates.append(3 * len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    ours = byol_recipe(32)
    kornia_jitter = byol_recipe(32)
    for pipeline in kornia_jitter:
        for index, module in enumerate(pipeline):
            if isinstance(module, ColorJitter):
                pipeline[index] = K.ColorJitter(
                    module.brightness, module.contrast, module.saturation, module.hue, p=module.p
                )
    for _ in range(2):
        before, after = _rate(kornia_jitter, batch), _rate(ours, batch)
        print(
            f"BYOL views, batch 256, 32 px: kornia ColorJitter {before:.0f} img/s, "
            f"sslplug ColorJitter {after:.0f} img/s, ratio {after / before:.2f}"
        )


if __name__ == "__main__":
    main()
