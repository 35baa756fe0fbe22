"""The MLP block (sslplug.nn.MLP): its default layout, and the options of DINO-style heads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sslplug.errors import ConfigError
from sslplug.nn import MLP


def _hand_built(last_batch_norm: bool) -> nn.Sequential:
    """The layout MLP(8, [16, 12], 4) has always had, written out layer by layer."""
    layers = [
        nn.Linear(8, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(inplace=True),
        nn.Linear(16, 12, bias=False),
        nn.BatchNorm1d(12),
        nn.ReLU(inplace=True),
        nn.Linear(12, 4, bias=not last_batch_norm),
    ]
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(4, affine=False))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("last_batch_norm", [False, True])
def test_default_layout_and_keys_are_unchanged(last_batch_norm):
    mlp, reference = MLP(8, [16, 12], 4, last_batch_norm), _hand_built(last_batch_norm)
    assert [repr(m) for m in mlp] == [repr(m) for m in reference]
    ours, theirs = mlp.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    mlp.load_state_dict(theirs)  # a checkpoint of the old layout loads strictly
    x = torch.randn(5, 8)
    torch.testing.assert_close(mlp.eval()(x), reference.eval()(x), rtol=0, atol=0)
    assert mlp.last_layer is mlp[6]


def test_gelu_without_batch_norm_gives_biased_hidden_layers():
    mlp = MLP(8, [16, 12], 4, activation="gelu", batch_norm=False)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert all(m.bias is not None for m in mlp if isinstance(m, nn.Linear))
    assert mlp(torch.randn(1, 8)).shape == (1, 4)  # no batch norm: a batch of one is fine


def test_an_unknown_activation_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'tanh'.*relu, gelu"):
        MLP(8, [16], 4, activation="tanh")


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_weight_normed_last_layer_has_unit_rows(norm_last_layer):
    mlp = MLP(
        8,
        [16],
        32,
        activation="gelu",
        batch_norm=False,
        weight_norm_last=True,
        norm_last_layer=norm_last_layer,
    )
    last = mlp.last_layer
    assert last is mlp[-1] and last.bias is None
    magnitude = last.parametrizations.weight.original0
    assert magnitude.requires_grad is not norm_last_layer
    torch.testing.assert_close(torch.linalg.vector_norm(last.weight, dim=1), torch.ones(32))

    optimizer = torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], lr=0.5)
    mlp(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    norms = torch.linalg.vector_norm(last.weight.detach(), dim=1)
    if norm_last_layer:
        torch.testing.assert_close(norms, torch.ones(32))
    else:
        assert not torch.allclose(norms, torch.ones(32))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"activation": "gelu", "batch_norm": False},
        {"batch_norm": False, "weight_norm_last": True},
        {"weight_norm_last": True, "norm_last_layer": False},
    ],
)
def test_state_dict_and_deepcopy_round_trip(options):
    torch.manual_seed(0)
    source = MLP(8, [16], 6, **options)
    torch.manual_seed(1)
    target = MLP(8, [16], 6, **options)
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 8)
    for copied in (target, copy.deepcopy(source)):
        torch.testing.assert_close(copied.eval()(x), source.eval()(x), rtol=0, atol=0)
        assert [p.requires_grad for p in copied.parameters()] == [
            p.requires_grad for p in source.parameters()
        ]
