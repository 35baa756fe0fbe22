"""``sslplug.EMATeacher``: a momentum copy of any encoder that returns what it returns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sslplug


class TokenEncoder(sslplug.Encoder):
    """Returns projections and per-patch tokens in ``extras``, with dropout and a batch norm."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8)), 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, views: sslplug.Views) -> sslplug.Outputs:
        features = [self.drop(self.backbone(v)) for v in views.images]
        tokens = tuple(f.view(-1, 4, 2) for f in features)
        return sslplug.Outputs(projections=tuple(features), extras={"tokens": tokens})


def _views(seed: int = 0) -> sslplug.Views:
    generator = torch.Generator().manual_seed(seed)
    return sslplug.Views(images=(torch.rand(6, 3, 2, 2, generator=generator),) * 2)


def test_it_returns_what_the_encoder_returns_tokens_included_without_gradient():
    torch.manual_seed(0)
    encoder = TokenEncoder().eval()
    teacher = sslplug.EMATeacher(encoder, 0.99, provides={"target_projection"})
    out = teacher(_views())
    expected = encoder(_views())
    assert isinstance(out, sslplug.Outputs) and set(out.extras) == {"tokens"}
    assert torch.equal(out.extras["tokens"][1], expected.extras["tokens"][1])
    assert teacher.provides == {"target_projection"}
    assert not any(p.requires_grad for p in teacher.network.parameters())
    assert all(k.startswith("network.") for k in teacher.state_dict())


def test_it_stays_in_eval_mode_so_dropout_and_stochastic_depth_are_off():
    teacher = sslplug.EMATeacher(TokenEncoder(), 0.99)
    teacher.train()
    assert teacher.training and not teacher.network.training
    assert not any(m.training for m in teacher.network.modules())
    first, second = teacher(_views()), teacher(_views())
    assert torch.equal(first.projections[0], second.projections[0])  # no dropout
    follows = sslplug.EMATeacher(TokenEncoder(), 0.99, train_mode=True).train()
    assert follows.network.training


def test_its_step_moves_every_weight_by_the_momentum_and_copies_the_buffers():
    torch.manual_seed(0)
    encoder = TokenEncoder()
    teacher = sslplug.EMATeacher(encoder, 0.9, schedule="constant")
    old = [p.clone() for p in teacher.network.parameters()]
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
        encoder.backbone[2].running_mean.fill_(3.0)
    assert teacher.step(encoder, 0, 10) == {"momentum": 0.9}
    for before, after, online in zip(old, teacher.network.parameters(), encoder.parameters()):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * online)
    assert torch.equal(teacher.network.backbone[2].running_mean, torch.full((8,), 3.0))
    cosine = sslplug.EMATeacher(encoder, 0.996)
    assert cosine.momentum(0, 10) == pytest.approx(0.996)
    assert cosine.momentum(10, 10) == pytest.approx(1.0)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'linear'"):
        sslplug.EMATeacher(TokenEncoder(), 0.99, schedule="linear")
    with pytest.raises(ValueError, match=r"got 1\.5"):
        sslplug.EMATeacher(TokenEncoder(), 1.5)
