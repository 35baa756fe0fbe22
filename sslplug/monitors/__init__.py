"""The core's own lifecycle plugins: what a run shows while it trains.

Each is a plugin on the lifecycle hooks like any third-party one, registered by the registry
before the installed plugins (as pytest registers its terminal reporter), and switched off with
``sslplug run --disable NAME`` or ``disable = ["NAME"]`` in the ``[train]`` table. Those with
settings declare them through ``sslplug_settings`` as any plugin does: a section named after
the plugin (``--set knn.k=20``, ``[health]`` in a config file), saved with every run.

==============  ===========================================================================
name            what it does
==============  ===========================================================================
``tensorboard``  scalars, the view grid and test-set embeddings (``tensorboard.
                 embedding_samples``) under ``RUN/tensorboard/``
``progress``     the progress bar with its ETA (the line after every epoch is the core's,
                 ``sslplug.report``, and stays without it)
``knn``          weighted kNN accuracy of the frozen features (before training and every
                 ``knn.every`` epochs), through ``sslplug_evaluate``
``health``       label-free measures (effective rank, spread, alignment, uniformity) on
                 ``health.samples`` images, on the same epochs as ``knn`` by default
                 (``health.every``), and the collapse warning
``view_grid``    ``RUN/views.png``: eight images of every view the model is shown
==============  ===========================================================================
"""

from __future__ import annotations

from typing import Any

__all__ = ["internal_plugins"]


def internal_plugins() -> list[tuple[str, Any]]:
    """Fresh instances of the core's lifecycle plugins, by name, in registration order."""
    from sslplug.monitors.health import HealthMonitor
    from sslplug.monitors.knn import KNNMonitor
    from sslplug.monitors.progress import ProgressBar
    from sslplug.monitors.tensorboard import TensorBoardLogger
    from sslplug.monitors.view_grid import ViewGrid

    return [
        ("tensorboard", TensorBoardLogger()),
        ("progress", ProgressBar()),
        ("knn", KNNMonitor()),
        ("health", HealthMonitor()),
        ("view_grid", ViewGrid()),
    ]
