"""``RUN/views.png``: eight images of every view, one row a view, as the model sees them.

Drawn at the start of a new run from the first training images, with the random-number state
forked, so that it changes nothing in training. Views of different sizes (global and local
crops) are scaled to the largest for the picture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslplug.augment import denormalize
from sslplug.context import RunContext
from sslplug.data import Loader
from sslplug.hookspecs import hookimpl

FILENAME = "views.png"


def _first_images(run: RunContext, count: int) -> tuple[Tensor, Tensor | None] | None:
    """The first ``count`` readable training images, as the view generator takes them: square,
    or at the stored resolution with their extents (``ViewGenerator.full_resolution``)."""
    train = run.data.train if run.data is not None else None
    if train is None or run.parts is None:
        return None
    full = bool(getattr(run.parts.views, "full_resolution", False))
    first = train.subset(torch.arange(min(len(train), 4 * count)))
    loader = Loader(first, len(first), torch.device("cpu"), shuffle=False, drop_last=False,
                    workers=0, full_resolution=full)
    for images, _, *extents in loader.epoch(0):
        kept = extents[0][:count] if extents and extents[0] is not None else None
        return images[:count], kept
    return None


def view_grid(views: tuple[Tensor, ...], count: int = 8) -> Tensor | None:
    """One row of ``count`` denormalised images per view, scaled to the largest view."""
    rows = [denormalize(v[:count].float().cpu()) for v in views if v.dim() == 4]
    if not rows:
        return None
    size = max(r.shape[-1] for r in rows)
    rows = [
        r if r.shape[-1] == size else F.interpolate(r, size=(size, size), mode="nearest")
        for r in rows
    ]
    import torchvision.utils  # loaded when a grid is drawn: it takes seconds

    return torchvision.utils.make_grid(torch.cat(rows).clamp(0, 1), nrow=count, padding=1)


class ViewGrid:
    """Writes ``views.png`` at the start of a new run (``tryfirst``, so that loggers starting
    after it can show the file)."""

    @hookimpl(tryfirst=True)
    def sslplug_run_start(self, run: RunContext) -> None:
        if run.progress.step != 0 or run.parts is None:
            return
        first = _first_images(run, 8)
        if first is None:
            return
        images, extents = first[0].to(run.device), first[1]
        devices = [run.device] if torch.device(run.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            views = (
                run.parts.views(images)
                if extents is None
                else run.parts.views(images, extents.to(run.device))
            )
        grid = view_grid(views.images)
        if grid is not None:
            import torchvision.utils

            torchvision.utils.save_image(grid, run.out_dir / FILENAME)
