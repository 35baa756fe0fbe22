"""The hook specifications: the contract between the sslplug core and its plugins.

This module is the reference for plugin authors. A plugin is a module (or any object) with
functions decorated ``@sslplug.hookimpl`` whose names match the specs below. It is registered
under a name through the entry-point group ``sslplug``::

    [project.entry-points.sslplug]
    mymethod = "my_package.my_module"

Component hooks (``sslplug_augmentation`` to ``sslplug_target_update``) are called once, at
set-up, on exactly one plugin each: the one the user chose for that component (``--plugin``
for all five, ``--augmentation``, ``--views``, ``--encoder``, ``--loss``, ``--target-update``
for one). They return objects that the training loop then calls directly; no hook is called
inside a step. A plugin may implement any subset of them.

A hook implementation may accept any subset of the arguments a spec names, so a loss that needs
no settings is simply ``def sslplug_loss(): ...``.

``settings`` is always the settings object of the plugin whose hook is called: an instance of
the class that plugin returned from ``sslplug_settings``, filled from the user's config and
``--set NAME.key=value``; ``None`` for a plugin that declares no settings.

Lifecycle hooks (``sslplug_run_start`` to ``sslplug_run_end``) are called on every registered
plugin that the user has not switched off (``--disable NAME``), and only on rank 0 of a
distributed run: the component objects run on every rank, loggers and monitors on one. The
core's own ``tensorboard`` (the TensorBoard logger), ``progress`` (the progress bar), ``knn``
(the kNN monitor), ``health`` (the label-free health monitor) and ``view_grid`` are such
plugins, registered before the installed ones. An exception raised in a lifecycle hook stops
the run as a ``PluginError`` naming the plugin and the hook (``sslplug.lifecycle``); an
interruption and sslplug's own errors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from sslplug.components import Augmentations, Encoder, TargetUpdate, ViewGenerator
    from sslplug.config import RunContext

PROJECT_NAME = "sslplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def sslplug_settings() -> type | None:
    """Declare the plugin's settings.

    Called once for every registered plugin, when plugins are loaded.

    Return an attrs class (decorated with ``@attrs.define`` or ``@attrs.frozen``) whose fields
    have defaults; the defaults are the method's published recipe, and the class docstring says
    which paper and table they come from. Users change a field with ``--set NAME.field=value`` or
    a ``[NAME]`` table in ``--config``. Fields may be ``bool``, ``int``, ``float``, ``str``, or a
    ``tuple`` of those. Return ``None`` (or do not implement the hook) for no settings.
    """


@hookspec
def sslplug_capabilities(register: Callable[[str, str], None]) -> None:
    """Register the capability names this plugin's components use.

    Called once for every registered plugin, when plugins are loaded. Call
    ``register(name, description)`` for each name that the plugin's components put in
    ``requires`` or ``provides`` and that the core does not register itself (the core's names
    are listed in ``sslplug.CAPABILITIES``). A name a component uses that nobody registered is
    registered on the declaring plugin's behalf with a ``DeprecationWarning`` (the first API's
    capabilities were free strings); from sslplug 0.3 it will fail at set-up. ``sslplug info
    PLUGIN`` shows what a plugin registers.
    """


@hookspec
def sslplug_data_sources(register: Callable[[str, Callable[..., Any], str], None]) -> None:
    """Add data sets that ``--data NAME`` (``data.name``) chooses by name.

    Called once for every registered plugin, when plugins are loaded. Call
    ``register(name, builder, description)`` for each: ``builder(settings, seed)`` receives the
    ``[data]`` settings (``settings.name`` is ``name``) and the run's seed and returns a
    ``sslplug.data.DataSet`` (see ``sslplug.data.register_source`` for what it holds);
    ``description`` is one line saying what the data set is. A name that is taken (a built-in
    data set's, or another plugin's) is refused and the plugin left out, as for any failure to
    register.
    """


@hookspec(firstresult=True)
def sslplug_augmentation(
    settings: Any, run: RunContext
) -> Augmentations | Sequence[nn.Module] | None:
    """Build the augmentation pipelines, one per view.

    Args:
        settings: this plugin's settings.
        run: image size, channels, device and other facts of the run.

    Return ``sslplug.Augmentations(pipelines, provides=...)``: modules, one per view (or per
    group of views, as the view generator that uses them expects), and the capabilities they
    provide. A pipeline maps a float batch ``(B, C, H, W)`` in ``[0, 1]`` on the device to an
    augmented batch, drawing random parameters per sample (kornia augmentations do); pipelines
    that end normalised provide ``normalized_views``. ``sslplug.augment`` has the standard
    recipes, which return ``Augmentations`` already. A plain list or tuple is still accepted
    (taken to provide ``normalized_views``) with a deprecation warning.
    """


@hookspec(firstresult=True)
def sslplug_views(
    settings: Any, run: RunContext, augmentations: Sequence[nn.Module]
) -> ViewGenerator | None:
    """Build the view generator.

    Args:
        settings: this plugin's settings.
        run: facts of the run.
        augmentations: the modules returned by the chosen ``sslplug_augmentation``.

    Return a ``ViewGenerator``: a module mapping the loader's uint8 batch ``(B, C, H, W)``, on the
    device, to ``Views``. Set its ``requires`` (what the augmentations must provide) and
    ``provides`` (``"two_views"`` and so on) so that the core can check it against the other
    components. Views may differ in size and carry group names (``Views.groups``).
    ``sslplug.MultiViewGenerator`` applies each augmentation to the batch once and suits every
    method whose views are augmented copies, multi-crop included; it is the default: a plugin
    that implements ``sslplug_augmentation`` and not this hook gets
    ``MultiViewGenerator(augmentations)`` for its views.
    """


@hookspec(firstresult=True)
def sslplug_encoder(
    settings: Any, run: RunContext, backbone: nn.Module, feature_dim: int
) -> Encoder | None:
    """Build the encoder: the backbone plus this method's heads.

    Args:
        settings: this plugin's settings.
        run: facts of the run.
        backbone: the network chosen with ``--backbone``, mapping ``(B, C, H, W)`` to
            ``(B, feature_dim)``; already initialised.
        feature_dim: the width of the backbone's output.

    Return an ``Encoder`` (an ``nn.Module``) whose ``forward(views)`` returns ``Outputs``, whose
    ``backbone`` attribute is the given backbone, and whose ``features(images)`` gives the
    features of whole images used by evaluation. Declare what it fills in ``provides``.
    """


@hookspec(firstresult=True)
def sslplug_loss(settings: Any, run: RunContext, encoder: Encoder) -> nn.Module | None:
    """Build the loss.

    Args:
        settings: this plugin's settings.
        run: facts of the run.
        encoder: the encoder, already built, possibly from another plugin: a loss that needs a
            head the encoder lacks (BYOL's predictor after a Barlow Twins encoder) reads
            ``encoder.provides`` and ``encoder.projection_dim`` and brings its own.

    Return an ``sslplug.Loss`` (an ``nn.Module``) whose ``forward(outputs, views, target)``
    returns ``sslplug.LossResult(loss, metrics)``: a scalar tensor to minimise and a dict of
    detached scalar tensors to log (the tuple ``(loss, metrics)`` is still accepted). ``target``
    is the target update's ``Outputs`` for the views it reads, or ``None`` when the run has no
    target network. Its parameters, if any, are trained with the encoder's. Declare what it needs
    in ``requires``.
    """


@hookspec(firstresult=True)
def sslplug_target_update(settings: Any, run: RunContext, encoder: Encoder) -> TargetUpdate | None:
    """Build the target network and its update rule, or return ``None`` for none.

    Args:
        settings: this plugin's settings.
        run: facts of the run.
        encoder: the online encoder, already built; copy from it what the target needs.

    Return a ``TargetUpdate`` (BYOL: an EMA copy of backbone and projector, updated by
    ``step`` after every optimizer step), or ``None``. Its ``reads`` names the groups of views it
    sees (``None``: all). A plugin that does not implement this hook gives a run without a
    target network, as does ``--target-update none``.
    """


@hookspec
def sslplug_run_start(run: RunContext) -> None:
    """Called once a run is set up, before its first step (rank 0 only).

    ``run.out_dir`` is the run folder; ``run.components`` names the plugin chosen for each
    component; ``run.parts`` holds the built components, ``run.data`` the data set,
    ``run.progress`` the step and epoch the run starts at (not 0 when resumed), and
    ``run.baseline`` what ``sslplug_evaluate`` measured on the random initialisation. Loggers and
    callbacks open their files here.
    """


@hookspec
def sslplug_step_end(run: RunContext, step: int, metrics: dict[str, float]) -> None:
    """Called after each optimizer step that is logged (rank 0 only).

    Called every ``train.log_every`` steps and at the last step of every epoch, not every step,
    so that reading the loss back from the device does not stall the loop. ``step`` counts
    finished steps from 1. ``metrics`` holds the loss, learning rate, images per second and the
    metrics the loss and target update returned, as Python floats.
    """


@hookspec
def sslplug_evaluate(run: RunContext, epoch: int) -> dict[str, float] | None:
    """Measure the encoder; return metrics to log and save, or ``None`` when not due.

    Called on rank 0 before the first step of a new run with ``epoch=0`` (the random
    initialisation: its results become ``run.baseline``), and after every epoch, before the
    checkpoint is written, with ``epoch`` counted from 1. Every plugin's results are merged into
    the epoch's metrics (the kNN monitor returns ``knn_top1``), which ``sslplug_epoch_end`` and
    ``summary.json`` receive. Put the encoder back in training mode if you change it.
    """


@hookspec
def sslplug_epoch_end(run: RunContext, epoch: int, metrics: dict[str, float]) -> None:
    """Called after each epoch's checkpoint is written (rank 0 only).

    ``epoch`` counts from 1. ``metrics`` holds the epoch's mean loss, throughput, the data-wait
    share and what ``sslplug_evaluate`` returned (``knn_top1`` in epochs the kNN monitor runs).
    """


@hookspec
def sslplug_run_end(run: RunContext, summary: dict[str, Any], error: BaseException | None) -> None:
    """Called when a run ends, however it ends (rank 0 only).

    After a normal end ``summary`` is what ``summary.json`` holds and ``error`` is ``None``. When
    the run stops on an error or an interruption (Ctrl-C, SIGTERM, a component or a lifecycle
    hook that raised), ``error`` is the exception and ``summary`` holds what is known so far;
    the last checkpoint is intact. It may come without a ``sslplug_run_start`` before it (a
    checkpoint that fails to restore), so close only what was opened. Close files here.
    """
