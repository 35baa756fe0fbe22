"""Optimizers, the learning-rate schedule, and the optimiser rules that components declare.

SGD and AdamW come from torch. LARS (You et al. 2017), which BYOL, SimCLR and Barlow Twins use
at large batch sizes, is not in torch and is defined here: SGD with momentum whose step for each
weight matrix is scaled by ``eta * ||w|| / ||grad + wd * w||``. Biases and batch-norm parameters
get neither weight decay nor the trust ratio, as in those papers.

A component that needs more of the optimiser than one learning rate for everything says so with
``OptimRules``: parameter groups with a learning rate or weight decay of their own (SimSiam's
predictor keeps a fixed learning rate, Chen & He 2021, Section 4.2), a layer frozen for the first
epochs (DINO's last layer, Caron et al. 2021), gradient clipping, a cosine schedule of the weight
decay (DINO). ``Optimization`` builds the optimizer and the schedule from the settings and those
rules, and applies the rules after each backward pass::

    rules = OptimRules(groups=(ParamGroup(head.last_layer, name="last_layer", frozen_epochs=1),),
                       clip_grad_norm=3.0, weight_decay_end_factor=10.0)
    optimization = Optimization(settings, [encoder, loss], steps_per_epoch, total_steps, [rules])
    for step, batch in enumerate(batches):
        optimization.zero_grad()
        loss(batch).backward()
        optimization.step(step)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from sslplug.config import OptimSettings
from sslplug.errors import CheckpointError, ConfigError

__all__ = [
    "LARS",
    "OptimRules",
    "Optimization",
    "ParamGroup",
    "build_optimizer",
    "warmup_cosine",
]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum.

    Parameter groups with ``lars_exclude=True`` (biases, norms) take plain SGD steps without
    weight decay.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _finite_non_negative(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is None:
        return
    _finite(attribute.name, value)
    if value < 0:
        raise ConfigError(f"{attribute.name} must be 0 or more, got {value!r}")


@attrs.frozen(eq=False)
class ParamGroup:
    """Parameters a component wants optimised by rules of their own.

    ``params`` is a module (all its parameters) or a sequence of parameters, kept as given and
    resolved to the trainable ones (``requires_grad``) when the optimizer is built; a group with
    none is skipped. Its parameters leave the default groups, even when they are not in the
    modules given to ``Optimization``.

    - ``lr_scale``: this group's learning rate is ``optim.lr * lr_scale``, then scheduled.
    - ``fixed_lr``: the learning rate stays at ``optim.lr * lr_scale``, with neither warm-up nor
      cosine decay (SimSiam's predictor, Chen & He 2021, Section 4.2 and Table 1).
    - ``weight_decay``: ``None`` takes ``optim.weight_decay``. Biases and norm parameters
      (``ndim <= 1``) get 0 whatever this says.
    - ``frozen_epochs``, ``frozen_steps``: the group is not updated (its gradient is dropped)
      during the first ``round(frozen_epochs * steps_per_epoch)`` or ``frozen_steps`` steps,
      whichever is more; DINO freezes its last layer during the first epoch (Caron et al. 2021).

    Compared by identity: two groups are equal only when they are the same object.
    """

    params: nn.Module | Sequence[nn.Parameter]
    name: str = ""
    lr_scale: float = attrs.field(default=1.0, validator=_finite_non_negative)
    fixed_lr: bool = False
    weight_decay: float | None = attrs.field(default=None, validator=_finite_non_negative)
    frozen_epochs: float = attrs.field(default=0.0, validator=_finite_non_negative)
    frozen_steps: int = attrs.field(default=0, validator=_finite_non_negative)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters of this group that require gradients, each once, in order."""
        params = self.params.parameters() if isinstance(self.params, nn.Module) else self.params
        return list({id(p): p for p in params if p.requires_grad}.values())


def _groups_tuple(groups: Iterable[ParamGroup]) -> tuple[ParamGroup, ...]:
    return tuple(groups)


@attrs.frozen
class OptimRules:
    """What a component asks of the optimiser.

    - ``groups``: parameter groups with rules of their own (``ParamGroup``).
    - ``clip_grad_norm``: when above 0, the gradient norm of all trained parameters together is
      clipped to this before each step (0: no clipping).
    - ``weight_decay_end``: deprecated (``weight_decay_end_factor`` replaces it; a component
      that sets it gets a ``DeprecationWarning`` naming its plugin, and it works until sslplug
      0.3): the weight decay follows a cosine from ``optim.weight_decay`` at the first step to
      this value at the last, as in DINO (Caron et al. 2021); groups with a weight decay of
      their own are scaled by the same factor. ``None``: constant weight decay.
    - ``weight_decay_end_factor``: the same cosine, relative to each group's own decay: every
      group ends at this factor times the decay it starts with (``optim.weight_decay``, or its
      ``ParamGroup.weight_decay``), whatever ``optim.weight_decay`` is. DINO's 0.04 to 0.4 is
      ``ParamGroup(..., weight_decay=0.04)`` with ``weight_decay_end_factor=10``. Set one of
      the two forms, not both.
    """

    groups: tuple[ParamGroup, ...] = attrs.field(default=(), converter=_groups_tuple)
    clip_grad_norm: float = attrs.field(default=0.0, validator=_finite_non_negative)
    weight_decay_end: float | None = attrs.field(default=None, validator=_finite_non_negative)
    weight_decay_end_factor: float | None = attrs.field(
        default=None, validator=_finite_non_negative
    )

    def __attrs_post_init__(self) -> None:
        if self.weight_decay_end is not None and self.weight_decay_end_factor is not None:
            raise ConfigError(
                f"OptimRules got weight_decay_end={self.weight_decay_end!r} and "
                f"weight_decay_end_factor={self.weight_decay_end_factor!r}; set one of them"
            )


def _merge_rules(rules: Sequence[OptimRules]) -> OptimRules:
    """One set of rules from those of several components: the groups of all, the tightest
    gradient clipping, and the weight-decay schedule they agree on."""
    clips = [r.clip_grad_norm for r in rules if r.clip_grad_norm > 0]
    ends = sorted({r.weight_decay_end for r in rules if r.weight_decay_end is not None})
    factors = sorted(
        {r.weight_decay_end_factor for r in rules if r.weight_decay_end_factor is not None}
    )
    if len(ends) + len(factors) > 1:
        raise ConfigError(
            f"components ask for different weight-decay schedules (weight_decay_end {ends}, "
            f"weight_decay_end_factor {factors}); all the rules that set one must agree"
        )
    return OptimRules(
        groups=tuple(g for r in rules for g in r.groups),
        clip_grad_norm=min(clips, default=0.0),
        weight_decay_end=ends[0] if ends else None,
        weight_decay_end_factor=factors[0] if factors else None,
    )


def _split_decay(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weights of linear and conv layers, and everything else (biases, norm parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def _trainable(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def _default_groups(settings: OptimSettings, params: Iterable[nn.Parameter]) -> list[dict]:
    decay, no_decay = _split_decay(params)
    groups: list[dict] = [
        {"params": decay, "weight_decay": settings.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if settings.name == "lars":
        groups[1]["lars_exclude"] = True
    return groups


def _make_optimizer(settings: OptimSettings, groups: list[dict]) -> torch.optim.Optimizer:
    if settings.name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    if settings.name == "lars":
        return LARS(groups, lr=settings.lr, momentum=settings.momentum)
    return torch.optim.AdamW(groups, lr=settings.lr)


def build_optimizer(settings: OptimSettings, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """The optimizer ``settings.name`` over the trainable parameters of ``modules``, in two
    groups: weights with ``settings.weight_decay``, and biases and norms without."""
    return _make_optimizer(settings, _default_groups(settings, _trainable(modules)))


def warmup_cosine(
    warmup_steps: int, total_steps: int, floor: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: linear from 0 over ``warmup_steps``,
    then a cosine from 1 to ``floor`` at ``total_steps`` (Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@attrs.frozen
class Cycles:
    """The cycles of a run's schedules (learning rate, weight decay, the target's momentum):
    ``(start, end)`` steps each, in order, the first starting at step 0.

    Inside a cycle every schedule runs its course from its start (warm-up included) to its end;
    after a cycle's end, until the next starts, each holds its end value. One cycle over the run
    is the plan of a run that was never extended; ``sslplug run --resume RUN --epochs N`` adds a
    cycle over the new epochs (``train.extend = "restart"``) or holds the end
    (``"continue"``), as ``train.cycles`` then records (``cycles_of``).
    """

    spans: tuple[tuple[int, int], ...]

    def position(self, step: int) -> tuple[int, int]:
        """``(step within its cycle, the cycle's steps)`` for the 0-based ``step``; past a
        cycle's end, its end: ``(steps, steps)``."""
        start, end = self.spans[0]
        for span in self.spans[1:]:
            if span[0] > step:
                break
            start, end = span
        length = end - start
        return min(step - start, length), length


def cycles_of(spans: Sequence[Sequence[int]], epochs: int, steps_per_epoch: int) -> Cycles:
    """The ``Cycles`` of ``train.cycles`` (``[start, end]`` epochs each; empty: one cycle over
    the ``epochs``), in steps; a ``ConfigError`` names a span that is not valid."""
    spans = [tuple(span) for span in spans] or [(0, epochs)]
    previous = 0
    for index, span in enumerate(spans):
        first = 0 if index == 0 else previous
        if len(span) != 2 or span[0] < first or span[1] <= span[0] or span[1] > epochs:
            raise ConfigError(
                f"train.cycles {[list(s) for s in spans]}: cycle {index + 1}, {list(span)}, is "
                f"not [start, end] epochs with start < end <= train.epochs ({epochs}), each "
                f"starting where the one before ended or later, the first at 0"
            )
        if index == 0 and span[0] != 0:
            raise ConfigError(f"train.cycles {[list(s) for s in spans]}: the first starts at 0")
        previous = span[1]
    return Cycles(tuple((a * steps_per_epoch, b * steps_per_epoch) for a, b in spans))


def _constant(step: int) -> float:
    return 1.0


@attrs.frozen
class _GroupRule:
    """How ``Optimization`` treats one of the optimizer's parameter groups."""

    name: str
    weight_decay: float
    frozen_until: int = 0


class Optimization:
    """The optimizer, its learning-rate schedule and the rules components declared, applied after
    each backward pass.

    The optimizer's parameter groups are, in order: ``decay`` and ``no_decay``, the trainable
    parameters of ``modules`` not claimed by any ``ParamGroup`` (always present, possibly
    empty), then for each ``ParamGroup`` its weights (``name``) and its biases and norm parameters
    (``name.no_decay``), each only when not empty. Every group dict carries its ``name``.

    Without rules, training is exactly that of ``build_optimizer`` with
    ``LambdaLR(optimizer, warmup_cosine(warmup, total_steps))``, and checkpoints of either load
    into the other.

    A weight-decay schedule scales from ``settings.weight_decay``, so it needs that to be above
    0; a ``ConfigError`` says so otherwise.
    """

    def __init__(
        self,
        settings: OptimSettings,
        modules: Sequence[nn.Module],
        steps_per_epoch: int,
        total_steps: int,
        rules: Sequence[OptimRules] = (),
        cycles: Cycles | None = None,
    ) -> None:
        for key in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            _finite(f"optim.{key}", getattr(settings, key))
        if steps_per_epoch < 1 or total_steps < 1:
            raise ConfigError(
                f"steps_per_epoch and total_steps must be 1 or more, "
                f"got {steps_per_epoch!r} and {total_steps!r}"
            )
        merged = _merge_rules(rules)
        if merged.weight_decay_end is not None and settings.weight_decay <= 0:
            raise ConfigError(
                f"a weight-decay schedule (to weight_decay_end={merged.weight_decay_end!r}) "
                f"starts from optim.weight_decay, which is {settings.weight_decay!r}; "
                "set optim.weight_decay above 0"
            )
        self.settings = settings
        self.total_steps = total_steps
        self.cycles = cycles or Cycles(((0, total_steps),))
        self.clip_grad_norm = merged.clip_grad_norm
        self.weight_decay_end = merged.weight_decay_end
        self.weight_decay_end_factor = merged.weight_decay_end_factor

        claimed = self._claim(merged.groups)
        unclaimed = [p for p in _trainable(modules) if id(p) not in claimed]
        groups = _default_groups(settings, unclaimed)
        self._rules = [_GroupRule(g["name"], g["weight_decay"]) for g in groups]
        warmup = round(settings.warmup_epochs * steps_per_epoch)

        def scheduled(step: int) -> float:
            at, length = self.cycles.position(step)
            return warmup_cosine(warmup, length, settings.lr_floor)(at)

        lambdas: list[Callable[[int], float]] = [scheduled, scheduled]
        for index, spec in enumerate(merged.groups):
            label = spec.name or f"group{index}"
            lr = settings.lr * spec.lr_scale
            wd = settings.weight_decay if spec.weight_decay is None else spec.weight_decay
            frozen_until = max(round(spec.frozen_epochs * steps_per_epoch), spec.frozen_steps)
            decay, no_decay = _split_decay(spec.trainable())
            parts = ((decay, label, wd), (no_decay, f"{label}.no_decay", 0.0))
            for params, name, group_wd in parts:
                if not params:
                    continue
                group = {"params": params, "lr": lr, "weight_decay": group_wd, "name": name}
                if settings.name == "lars" and params is no_decay:
                    group["lars_exclude"] = True
                groups.append(group)
                self._rules.append(_GroupRule(name, group_wd, frozen_until))
                lambdas.append(_constant if spec.fixed_lr else scheduled)

        self.optimizer = _make_optimizer(settings, groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)

    @staticmethod
    def _claim(groups: Sequence[ParamGroup]) -> dict[int, str]:
        """Which group claims each parameter, by ``id``; a parameter in two groups is an error."""
        owner: dict[int, str] = {}
        for index, spec in enumerate(groups):
            label = spec.name or f"group{index}"
            for p in spec.trainable():
                if id(p) in owner:
                    raise ConfigError(
                        f"a parameter of shape {tuple(p.shape)} is in both parameter groups "
                        f"{owner[id(p)]!r} and {label!r}; each parameter may be in one group only"
                    )
                owner[id(p)] = label
        return owner

    def weight_decay_factor(self, step: int) -> float:
        """The scheduled weight decay at ``step`` over ``optim.weight_decay``: a cosine from 1 at
        a cycle's first step to ``weight_decay_end / optim.weight_decay`` at its last (1
        unscheduled). With ``weight_decay_end_factor``: a cosine from 1 to that factor."""
        if self.weight_decay_end is None and self.weight_decay_end_factor is None:
            return 1.0
        at, length = self.cycles.position(step)
        cos = math.cos(math.pi * min(1.0, at / max(1, length - 1)))
        if self.weight_decay_end_factor is not None:
            end = self.weight_decay_end_factor
            return end + (1.0 - end) * 0.5 * (1.0 + cos)
        assert self.weight_decay_end is not None
        start, end = self.settings.weight_decay, self.weight_decay_end
        return (end + (start - end) * 0.5 * (1.0 + cos)) / start

    def step(self, step: int) -> None:
        """Apply the rules and take the optimizer and scheduler steps; call after the backward
        pass of the 0-based global ``step``.

        Frozen groups lose their gradient (so no optimizer moves them, not even by weight decay
        or momentum), the remaining gradients are clipped to ``clip_grad_norm`` together, and
        the weight decay is set for this step.
        """
        trained: list[nn.Parameter] = []
        factor = self.weight_decay_factor(step)
        scheduled = self.weight_decay_end is not None or self.weight_decay_end_factor is not None
        for group, rule in zip(self.optimizer.param_groups, self._rules, strict=True):
            if step < rule.frozen_until:
                for p in group["params"]:
                    p.grad = None
                continue
            trained += [p for p in group["params"] if p.grad is not None]
            if scheduled and rule.weight_decay > 0:
                group["weight_decay"] = rule.weight_decay * factor
        if self.clip_grad_norm > 0 and trained:
            torch.nn.utils.clip_grad_norm_(trained, self.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()

    def position(self, step: int) -> tuple[int, int]:
        """Where the 0-based ``step`` is in the schedules: ``(step within its cycle, the
        cycle's steps)``, what a target update's momentum schedule is given."""
        return self.cycles.position(step)

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none``) before the next backward pass."""
        self.optimizer.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        """The learning rate of the first default group at the last scheduler step."""
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": ..., "scheduler": ...}``, the layout of the engine's checkpoints."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``, or from a checkpoint of ``build_optimizer`` and
        ``LambdaLR`` when this run has no parameter groups of its own."""
        saved = len(state["optimizer"]["param_groups"])
        if saved != len(self._rules):
            names = ", ".join(rule.name for rule in self._rules)
            raise CheckpointError(
                f"the checkpoint's optimizer has {saved} parameter groups, this run has "
                f"{len(self._rules)} ({names}); the components' optimiser rules differ from "
                "those of the run that saved it"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the rate of the next step from this run's schedule, not the one saved: a run resumed
        # to more epochs than it planned starts a new cycle there (``Cycles``)
        step = self.scheduler.last_epoch
        rates = [
            base * rule(step)
            for base, rule in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True)
        ]
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        self.scheduler._last_lr = rates
        for group, rule in zip(self.optimizer.param_groups, self._rules, strict=True):
            group["name"] = rule.name
