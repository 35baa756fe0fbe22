"""``update_from_step``: a loss or target update that changes its state from the step's
outputs, called once per step after the optimiser step, without gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sslplug
from sslplug.config import OptimSettings
from sslplug.optim import Optimization
from sslplug.plugins import Components
from sslplug.step import ComponentFailure, train_step


class LinearEncoder(sslplug.Encoder):
    provides = frozenset({"projection"})

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), 5)

    def forward(self, views: sslplug.Views) -> sslplug.Outputs:
        return sslplug.Outputs(projections=tuple(self.backbone(v) for v in views.images))


class CentredLoss(sslplug.Loss):
    """A loss with a running centre of the projections, updated from the step's outputs."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(5))
        self.seen: list[tuple[torch.Tensor, bool, object]] = []
        self.fail = fail

    def forward(self, outputs, views, target):
        loss = (outputs.projections[0] - self.centre).pow(2).mean()
        return sslplug.LossResult(loss, {})

    def update_from_step(self, outputs, views, target):
        if self.fail:
            raise RuntimeError("centre went wrong")
        self.seen.append((outputs.projections[0], torch.is_grad_enabled(), target))
        self.centre.mul_(0.9).add_(outputs.projections[0].mean(dim=0), alpha=0.1)


class Target(sslplug.TargetUpdate):
    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def forward(self, views):
        return sslplug.Outputs(projections=(views.images[0].flatten(1)[:, :5],))

    def update_from_step(self, outputs, views, target):
        self.order.append("update_from_step")

    def step(self, encoder, step, total_steps):
        self.order.append("step")
        return None


def _step(loss: nn.Module, target: sslplug.TargetUpdate | None = None) -> tuple:
    torch.manual_seed(0)
    encoder = LinearEncoder()
    parts = Components(
        augmentations=(), views=None, encoder=encoder, loss=loss, target_update=target,
        sources={"loss": "centred", "target_update": "centred"},
    )  # fmt: skip
    optimization = Optimization(OptimSettings(name="sgd", lr=0.1), [encoder, loss], 1, 1)
    views = sslplug.Views(images=(torch.rand(6, 3, 4, 4),))
    before = [p.detach().clone() for p in encoder.backbone[1].parameters()]
    train_step(parts, optimization, views, 0, 1, torch.autocast("cpu", enabled=False),
               names=parts.sources)  # fmt: skip
    return encoder, before, views


def test_the_loss_updates_its_state_from_the_steps_outputs_once_without_gradient():
    loss = CentredLoss()
    encoder, before, views = _step(loss, Target())
    assert len(loss.seen) == 1
    projections, grad_enabled, target = loss.seen[0]
    assert not grad_enabled
    # the outputs of this step's forward pass (made before the optimiser step moved the weights)
    expected = nn.functional.linear(views.images[0].flatten(1), *before)
    assert not torch.equal(before[0], encoder.backbone[1].weight)
    assert isinstance(target, sslplug.Outputs)
    assert torch.allclose(projections, expected, atol=1e-6)
    assert torch.allclose(loss.centre, 0.1 * projections.mean(dim=0))
    assert "centre" in loss.state_dict()


def test_the_target_updates_from_the_step_before_its_own_step():
    target = Target()
    _step(CentredLoss(), target)
    assert target.order == ["update_from_step", "step"]


def test_an_update_that_raises_names_the_plugin():
    with pytest.raises(ComponentFailure, match=r"plugin 'centred' raised in its loss.*centre went"):
        _step(CentredLoss(fail=True))
