"""The objects that flow between components in one training step, and their base classes.

One step of training is::

    views   = view_generator(augmentations(batch))   # Views, in named groups
    outputs = encoder(views)                         # Outputs
    target  = target_update(views.select(target_update.reads))  (no grad)   # or None
    result  = loss_fn(outputs, views, target)        # LossResult(loss, metrics)
    ... backward, optimizer step (with the rules components declared) ...
    target_update.step(encoder, step, total_steps)

Components say what they need and what they give through two attributes, ``requires`` and
``provides``: sets of capability names. A class sets their defaults; an instance may set its
own (a loss that brings its own predictor requires less). Every name must be registered: the
core registers the ones below, and a plugin registers its own through the
``sslplug_capabilities`` hook. The core checks a mix of components at set-up, before the first
step, so that an incompatible mix fails with a message naming both plugins instead of a shape
error deep inside the loss; an unregistered name is an error too.

======================  ==============  =========================================================
capability              provided by     meaning
======================  ==============  =========================================================
``normalized_views``    augmentation    each pipeline maps a float batch in ``[0, 1]`` to an
                                        augmented, normalised float batch (any size)
``two_views``           view generator  ``Views.images`` holds at least two augmented views of
                                        the same images, in the same order
``view_groups``         view generator  ``Views.groups`` names the group of every view
                                        (``"global"`` and ``"local"`` for multi-crop)
``rotation_labels``     view generator  ``Views.targets["rotation"]``: the rotation id (0-3, in
                                        quarter turns) of every image of ``Views.images[0]``
``permutation_labels``  view generator  ``Views.targets["permutation"]``: the id of the
                                        permutation that shuffled each image's tiles
``patch_grid``          view generator  ``Views.images[0]`` holds every patch of the batch,
                                        image-major, row-major; ``targets["grid"]`` its shape
``projection``          encoder         ``Outputs.projections`` holds one tensor per view
``prediction``          encoder         ``Outputs.predictions`` holds one tensor per view
``logits``              encoder         ``Outputs.logits`` holds pretext-task logits
``patch_predictions``   encoder         ``Outputs.predictions[0]``: ``(K, B, gh, gw, D)``, the
                                        prediction of the patch ``k`` rows below each position;
                                        ``extras["patches"]``: ``(B, gh, gw, D)`` patch vectors
``target_projection``   target update   its ``Outputs.projections`` holds one tensor per view it
                                        reads
``patch_tokens``        backbone        the backbone is an ``sslplug.ViTBackbone``: its
                                        ``tokens(images, keep)`` gives the class and patch
                                        tokens (``--backbone vit_tiny``, ``timm:NAME``)
``patch_mask``          view generator  ``Views.targets["keep"]`` ``(B, K)`` and ``["masked"]``
                                        ``(B, N-K)``: visible and hidden patch indices of
                                        ``Views.images[0]``, row-major (``sslplug.masking``)
======================  ==============  =========================================================

What every component may rely on:

- **State.** A component is an ``nn.Module``; everything in its ``state_dict`` (parameters and
  buffers, and whatever ``get_extra_state`` returns) is saved in every checkpoint and restored
  on resume, for the view generator, the encoder, the loss and the target update alike. Keep a
  queue or a centre in a buffer (``register_buffer``); keep plain counters in
  ``get_extra_state``/``set_extra_state`` (tensors, numbers, strings, lists and dicts only:
  checkpoints are read with ``weights_only=True``).
- **Time.** ``run.progress`` (the ``RunContext`` every hook receives) is updated by the core
  before each step: ``step``, ``epoch``, ``steps_per_epoch``, ``total_steps`` and the derived
  ``epoch_float`` and ``fraction``. Keep ``run`` and read it in ``forward`` for warm-ups and
  schedules, instead of counting calls.
- **Optimiser rules.** ``optim_rules()`` on any component returns an ``sslplug.OptimRules``:
  parameter groups with their own learning rate or weight decay, layers frozen for the first
  epochs, gradient clipping, a weight-decay schedule; the core applies them. The optimiser
  trains the encoder's and the loss's parameters, and those a ``ParamGroup`` names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslplug.errors import ComponentMismatchError
from sslplug.nn import ema_update, scheduled_momentum

if TYPE_CHECKING:
    from sslplug.optim import OptimRules

__all__ = [
    "CAPABILITIES",
    "Augmentations",
    "Encoder",
    "Loss",
    "LossResult",
    "MomentumTarget",
    "Outputs",
    "PredictorEncoder",
    "PretextCrossEntropy",
    "ProjectorEncoder",
    "TargetUpdate",
    "ViewGenerator",
    "Views",
    "run_by_resolution",
]

CAPABILITIES: dict[str, str] = {
    "normalized_views": "augmentation pipelines that output normalised float views",
    "two_views": "at least two augmented views of the same images",
    "view_groups": "Views.groups names the group of every view (e.g. global and local crops)",
    "rotation_labels": "Views.targets['rotation']: quarter turns applied to each image",
    "permutation_labels": "Views.targets['permutation']: the permutation id of each image",
    "patch_grid": "every patch of the batch in Views.images[0]; Views.targets['grid']",
    "patch_predictions": "per-step patch predictions and the patch vectors (CPC)",
    "projection": "projector outputs, one tensor per view",
    "prediction": "predictor outputs, one tensor per view",
    "logits": "pretext-task logits",
    "target_projection": "target-network projections, one tensor per view it reads",
    "teacher_features": "target Outputs.features: a frozen teacher's features of every view",
    "patch_tokens": "a backbone with patch tokens (sslplug.ViTBackbone: tokens(images, keep))",
    "patch_mask": "Views.targets['keep'] / ['masked']: visible / hidden patch indices (MAE)",
}

DEFAULT_GROUP = "global"


class Augmentations(tuple):
    """What ``sslplug_augmentation`` returns: the pipelines, one per view, and what they produce.

    It is a tuple of modules, so a view generator indexes and iterates it as before;
    ``provides`` names the capabilities of the pipelines (``"normalized_views"`` for pipelines
    that end in ``sslplug.Normalization``). ``groups`` optionally names the group of each
    pipeline's view (multi-crop: ``("global", "global", "local", ...)``); a view generator that
    is given no groups of its own takes these, so multi-crop views keep their groups when mixed
    with another plugin's view generator. A plain tuple or list is still accepted, taken to
    provide ``normalized_views``, with a deprecation warning.
    """

    provides: frozenset[str]
    groups: tuple[str, ...]

    def __new__(
        cls,
        pipelines: Iterable[nn.Module],
        provides: Iterable[str] = ("normalized_views",),
        groups: Sequence[str] = (),
    ) -> Augmentations:
        obj = super().__new__(cls, tuple(pipelines))
        obj.provides = frozenset(provides)
        obj.groups = tuple(groups)
        if obj.groups and len(obj.groups) != len(obj):
            raise ValueError(
                f"Augmentations got {len(obj)} pipelines but {len(obj.groups)} group names "
                f"{obj.groups}; give one group per pipeline"
            )
        return obj

    def __repr__(self) -> str:
        groups = f", groups={self.groups}" if self.groups else ""
        return f"Augmentations({len(self)} pipelines, provides={sorted(self.provides)}{groups})"


@attrs.define
class Views:
    """What the encoder sees in one step.

    Attributes:
        images: one float tensor ``(B, C, H, W)`` per view, normalised, on the device. Views may
            differ in size (multi-crop: two global crops and several smaller local ones).
        targets: pretext labels by name (``"rotation"``: ``(B,)`` int64, and so on).
        groups: the group of every view, in order (``("global", "global", "local", ...)``);
            empty means every view is ``"global"``.
    """

    images: tuple[Tensor, ...]
    targets: dict[str, Tensor] = attrs.Factory(dict)
    groups: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.groups and len(self.groups) != len(self.images):
            raise ValueError(
                f"Views has {len(self.images)} images but {len(self.groups)} groups "
                f"{self.groups}; give one group name per view"
            )

    @property
    def batch_size(self) -> int:
        return self.images[0].shape[0]

    def group_names(self) -> tuple[str, ...]:
        """The group of every view (``"global"`` for all when no groups were given)."""
        return self.groups or (DEFAULT_GROUP,) * len(self.images)

    def indices(self, *groups: str) -> tuple[int, ...]:
        """Positions of the views that belong to any of ``groups``."""
        return tuple(i for i, g in enumerate(self.group_names()) if g in groups)

    def select(self, groups: Sequence[str] | None) -> Views:
        """The views of ``groups`` only, in their order (all views for ``None``); the targets
        are shared."""
        if groups is None:
            return self
        index = self.indices(*groups)
        if not index:
            raise ValueError(
                f"no view belongs to the groups {tuple(groups)}; the views' groups are "
                f"{sorted(set(self.group_names()))}"
            )
        names = self.group_names()
        return Views(
            images=tuple(self.images[i] for i in index),
            targets=self.targets,
            groups=tuple(names[i] for i in index),
        )


@attrs.define
class Outputs:
    """What an encoder (or a target network) computes from ``Views``.

    Every field is optional; the encoder's ``provides`` says which ones it fills.

    Attributes:
        features: backbone features, one tensor ``(B, D)`` per view.
        projections: projector outputs, one per view.
        predictions: predictor outputs, one per view.
        logits: pretext-task logits.
        extras: anything else a matching loss understands, by name.
    """

    features: tuple[Tensor, ...] = ()
    projections: tuple[Tensor, ...] = ()
    predictions: tuple[Tensor, ...] = ()
    logits: Tensor | None = None
    extras: dict[str, Tensor] = attrs.Factory(dict)


@attrs.define
class LossResult:
    """What a loss returns: the scalar to minimise and detached scalar metrics to log.

    The tuple ``(loss, metrics)`` of the first version of the contract is still accepted.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = attrs.Factory(dict)

    def __iter__(self) -> Iterator[Any]:
        """``loss, metrics = result``, as with the tuple of the first contract."""
        return iter((self.loss, self.metrics))


def run_by_resolution(
    module: Callable[[Tensor], Tensor], images: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``module`` applied to every view, in one batched call per resolution.

    Views of the same shape are concatenated and go through ``module`` together (two global
    crops in one call, all local crops in another), and the outputs come back one per view, in
    the views' order. With views of one size this is one call, as before multi-crop.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, view in enumerate(images):
        by_shape.setdefault(tuple(view.shape[1:]), []).append(i)
    out: list[Tensor | None] = [None] * len(images)
    for index in by_shape.values():
        sizes = [images[i].shape[0] for i in index]
        batch = torch.cat([images[i] for i in index]) if len(index) > 1 else images[index[0]]
        result = module(batch)
        for i, part in zip(index, result.split(sizes)):
            out[i] = part
    return tuple(t for t in out if t is not None)


class _Component(nn.Module):
    """What every component shares: capability names and optimiser rules."""

    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()

    def optim_rules(self) -> OptimRules | None:
        """Parameter groups, frozen layers, clipping or a weight-decay schedule this component
        asks of the optimiser (see ``sslplug.OptimRules``); ``None`` for none."""
        return None


class ViewGenerator(_Component):
    """Turns a uint8 batch ``(B, C, H, W)`` on the device into ``Views``.

    Subclasses implement ``forward``. It is an ``nn.Module`` so that augmentation modules it
    holds move with ``.to(device)``, and its ``state_dict`` is checkpointed.

    ``forward(batch)`` receives square images at ``data.image_size``. A generator whose
    ``full_resolution`` is true instead receives, for data whose images keep their own sizes
    (folders, prepared data, shards), ``forward(batch, extents)``: a canvas at the stored
    resolution, each image in its top-left corner, and ``extents`` ``(B, 3)``: each image's
    height and width there, and 1 where a portrait image lies on its side (``None`` when the
    images all fill the batch upright), so that its crops read the stored pixels
    (``sslplug.RandomResizedCrop`` handles all of it; ``docs/data.md``). False by default: a
    generator written for square batches keeps getting them.
    """

    full_resolution: bool = False

    def forward(self, batch: Tensor) -> Views:  # pragma: no cover - interface
        raise NotImplementedError


class Encoder(_Component):
    """The backbone plus a method's heads.

    ``forward(views)`` returns ``Outputs``. ``features(images)`` gives the features of whole,
    un-augmented images that evaluation (kNN, linear probe) uses; the default is the backbone's
    pooled output, and methods whose backbone sees parts of an image (patches, tiles) override it.

    Attributes:
        backbone: the network whose features are the product of pre-training.
        feature_dim: the width of ``features(images)``.
        projection_dim: the width of ``Outputs.projections`` for encoders that provide
            ``projection`` (0 otherwise), so that a loss from another plugin can size its own
            heads.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projection_dim = 0

    def forward(self, views: Views) -> Outputs:  # pragma: no cover - interface
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        return self.backbone(images)


class ProjectorEncoder(Encoder):
    """A backbone followed by a projector head; the backbone runs once per resolution.

    The encoder of SimCLR and Barlow Twins; BYOL's adds a predictor. Provides ``projection``.
    Views of different sizes (global and local crops) work: views of one size share a call.
    """

    provides = frozenset({"projection"})

    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: nn.Module, projection_dim: int
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = projector
        self.projection_dim = projection_dim

    def forward(self, views: Views) -> Outputs:
        features = run_by_resolution(self.backbone, views.images)
        sizes = [f.shape[0] for f in features]
        projections = self.projector(torch.cat(features)).split(sizes)
        return Outputs(features=features, projections=projections)


class PredictorEncoder(ProjectorEncoder):
    """A backbone, a projector and a predictor on top of the projector (BYOL, SimSiam, MoCo v3,
    NNCLR); provides ``projection`` and ``prediction``.

    The predictor maps every view's projection in one batched call. Build the projector before
    the predictor, so that their initial weights are drawn in that order.
    """

    provides = frozenset({"projection", "prediction"})

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        projector: nn.Module,
        projection_dim: int,
        predictor: nn.Module,
    ) -> None:
        super().__init__(backbone, feature_dim, projector, projection_dim)
        self.predictor = predictor

    def forward(self, views: Views) -> Outputs:
        outputs = super().forward(views)
        sizes = [z.shape[0] for z in outputs.projections]
        outputs.predictions = self.predictor(torch.cat(outputs.projections)).split(sizes)
        return outputs


class Loss(_Component):
    """Base class of losses: ``forward(outputs, views, target)`` returns a ``LossResult``.

    ``target`` is the target update's ``Outputs`` (for the views it reads), or ``None`` when
    the run has no target network. Parameters of the loss are trained with the encoder's.
    State that follows the step's outputs (a running centre) is changed in an optional
    ``update_from_step(outputs, views, target)``, called once per step after the optimiser
    step, without gradient; a ``TargetUpdate`` may define it too.

    ``collapse_hint`` says what usually makes the method's embeddings collapse and what to
    check; the health monitor's collapse warning names it as the likely causes (``""``: the
    causes common to every method).
    """

    collapse_hint: str = ""

    def forward(
        self, outputs: Outputs, views: Views, target: Outputs | None
    ) -> LossResult:  # pragma: no cover - interface
        raise NotImplementedError


class PretextCrossEntropy(Loss):
    """Cross-entropy of ``Outputs.logits`` against the pretext labels ``Views.targets[name]``.

    The loss of every classification pretext task (RotNet's rotations, Jigsaw's permutations);
    it logs the classifier's accuracy as ``{name}_accuracy``. ``capability`` is what the view
    generator must provide for those labels.
    """

    def __init__(self, name: str, capability: str) -> None:
        super().__init__()
        self.name = name
        self.requires = frozenset({capability, "logits"})

    def forward(self, outputs: Outputs, views: Views, target: Outputs | None) -> LossResult:
        labels = views.targets[self.name]
        assert outputs.logits is not None  # required capability: logits
        loss = F.cross_entropy(outputs.logits.float(), labels)
        accuracy = (outputs.logits.detach().argmax(1) == labels).float().mean()
        return LossResult(loss, {f"{self.name}_accuracy": accuracy})


class TargetUpdate(_Component):
    """Owns a target network: computes its outputs and updates it after each optimizer step.

    ``forward(views)`` is called under ``torch.no_grad()`` with the views of the groups named
    in ``reads`` (``None``: every view; DINO's teacher reads ``("global",)``).
    ``step(encoder, step, total_steps)`` is called after every optimizer step, with ``step``
    counted from 0 to ``total_steps - 1`` of the schedules' cycle (the whole run, unless a
    resume added epochs: ``sslplug.optim.Cycles``), and ``step == total_steps`` after a cycle
    whose end is held (``train.extend = "continue"``): a momentum schedule then stays at its end
    value, not past it. It returns scalar metrics to log (BYOL returns
    ``{"tau": ...}``), or ``None``. The target network's parameters must not be trained by the
    optimizer: keep ``requires_grad`` off. State the target shares with the loss (MoCo's queue
    of keys) lives here, and the loss reads it from ``target``'s ``extras``.
    """

    reads: tuple[str, ...] | None = None

    def forward(self, views: Views) -> Outputs:  # pragma: no cover - interface
        raise NotImplementedError

    def step(
        self, encoder: Encoder, step: int, total_steps: int
    ) -> dict[str, Any] | None:  # pragma: no cover - interface
        raise NotImplementedError


class MomentumTarget(TargetUpdate):
    """A momentum copy of the encoder's backbone and projector (BYOL's target network, MoCo's
    key encoder, DINO's teacher), moved after every optimizer step by
    ``theta_target <- m * theta_target + (1 - m) * theta_online``.

    ``m`` follows a cosine from ``momentum_base`` at the first step to 1 at the last (BYOL,
    Grill et al. 2020, Section 3.2), or stays at ``momentum_base`` with ``schedule="constant"``
    (MoCo v2). ``forward`` gives the projections of every view it reads, one batched call per
    resolution; ``step`` logs the momentum under ``metric``. ``network`` is the copy, without
    gradients; methods with more state (a queue, a centre) subclass this and add buffers.

    Args:
        encoder: the online encoder; it must have a ``projector`` module and a
            ``projection_dim``, as ``ProjectorEncoder`` has.
        name: how errors call this target network ("the BYOL target network").
    """

    requires = frozenset({"projection"})
    provides = frozenset({"target_projection"})
    metric = "momentum"

    def __init__(
        self,
        encoder: Encoder,
        momentum_base: float,
        schedule: str = "cosine",
        name: str = "the target network",
    ) -> None:
        super().__init__()
        projector = getattr(encoder, "projector", None)
        if not isinstance(projector, nn.Module) or not getattr(encoder, "projection_dim", 0):
            raise ComponentMismatchError(
                f"{name} copies the encoder's backbone and projector, but the encoder "
                f"{type(encoder).__name__} has no 'projector' module and projection_dim"
            )
        scheduled_momentum(momentum_base, schedule, 0, 1)  # an unknown schedule is refused now
        self.network = nn.Sequential(copy.deepcopy(encoder.backbone), copy.deepcopy(projector))
        self.network.requires_grad_(False)
        self.momentum_base = momentum_base
        self.schedule = schedule

    def momentum(self, step: int, total_steps: int) -> float:
        """``m`` after optimizer step ``step`` of ``total_steps``."""
        return scheduled_momentum(self.momentum_base, self.schedule, step, total_steps)

    def forward(self, views: Views) -> Outputs:
        return Outputs(projections=run_by_resolution(self.network, views.images))

    @torch.no_grad()
    def step(self, encoder: Encoder, step: int, total_steps: int) -> dict[str, Any] | None:
        momentum = self.momentum(step, total_steps)
        online = nn.Sequential(encoder.backbone, encoder.projector)  # type: ignore[arg-type]
        ema_update(self.network, online, momentum)
        return {self.metric: momentum}
