"""Multi-crop views from ``sslplug.multicrop_recipe`` and the shared settings validators."""

from __future__ import annotations

import attrs
import pytest
import torch

import sslplug


def _batch(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_multicrop_gives_two_global_and_the_local_crops_in_groups():
    augmentations = sslplug.multicrop_recipe(32, local_crops=4, local_size=12)
    assert augmentations.groups == ("global", "global", "local", "local", "local", "local")
    views = sslplug.MultiViewGenerator(augmentations)(_batch())
    assert [tuple(v.shape) for v in views.images] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 4
    assert views.groups == augmentations.groups
    assert views.select(["global"]).images == views.images[:2]


def test_local_crops_default_to_three_sevenths_of_the_side():
    views = sslplug.MultiViewGenerator(sslplug.multicrop_recipe(32, local_crops=1))(_batch())
    assert views.images[2].shape[-1] == 14  # 96 of 224 px in the papers, 14 of 32 here


def test_generator_provides_view_groups_taken_from_the_augmentations():
    generator = sslplug.MultiViewGenerator(sslplug.multicrop_recipe(32, local_crops=2))
    assert generator.provides == {"two_views", "view_groups"}
    plain = sslplug.MultiViewGenerator(sslplug.simclr_recipe(32))
    assert plain.provides == {"two_views"} and plain.groups == ()


def test_a_subclass_keeps_the_requires_and_provides_it_declares_on_the_class():
    class MaskedViews(sslplug.MultiViewGenerator):
        requires = frozenset({"normalized_views", "patch_tokens"})
        provides = frozenset({"patch_mask"})

    generator = MaskedViews(sslplug.multicrop_recipe(32, local_crops=1))
    assert generator.provides == {"patch_mask", "two_views", "view_groups"}
    assert generator.requires == {"normalized_views", "patch_tokens"}
    assert MaskedViews.provides == {"patch_mask"}  # the class's own set is left as it was
    one = MaskedViews([sslplug.simclr_recipe(32)[0]])
    assert one.provides == {"patch_mask"}


def test_groups_given_to_the_generator_win_over_those_of_the_augmentations():
    augmentations = sslplug.multicrop_recipe(32, local_crops=1)
    generator = sslplug.MultiViewGenerator(augmentations, groups=("a", "b", "c"))
    assert generator(_batch()).groups == ("a", "b", "c")


def test_pipelines_differ_per_crop_kind():
    augmentations = sslplug.multicrop_recipe(
        32, local_crops=1, blur_prob=(1.0, 0.1, 0.5), solarize_prob=(0.0, 0.2, 0.0)
    )
    kinds = [[type(step).__name__ for step in pipeline] for pipeline in augmentations]
    assert "RandomSolarize" not in kinds[0] and "RandomSolarize" in kinds[1]
    assert "RandomSolarize" not in kinds[2]
    assert all("RandomGaussianBlur" in k for k in kinds)


def test_no_local_crops_is_two_global_views():
    augmentations = sslplug.multicrop_recipe(32, local_crops=0)
    assert augmentations.groups == ("global", "global")
    with pytest.raises(ValueError, match="local_crops must be 0 or more, got -1"):
        sslplug.multicrop_recipe(32, local_crops=-1)


def test_augmentations_refuse_a_group_count_that_differs_from_the_pipelines():
    with pytest.raises(ValueError, match="2 pipelines but 3 group names"):
        sslplug.Augmentations([torch.nn.Identity()] * 2, groups=("global",) * 3)


@attrs.define
class _Settings:
    temperature: float = attrs.field(default=0.1, validator=sslplug.positive)
    crops: int = attrs.field(default=0, validator=sslplug.non_negative)
    momentum: float = attrs.field(default=0.9, validator=sslplug.unit_interval)
    scale: tuple[float, float] = attrs.field(default=(0.2, 1.0), validator=sslplug.scale_range)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 0.0, "temperature must be greater than 0, got 0.0"),
        ("crops", -2, "crops must be 0 or more, got -2"),
        ("momentum", 1.5, "momentum must be between 0 and 1, got 1.5"),
        ("scale", (0.5, 0.2), r"scale must be a range \(low, high\) with 0 < low <= high <= 1"),
        ("scale", (0.0, 1.0), r"got \(0.0, 1.0\)"),
    ],
)
def test_validators_name_the_setting_and_the_value(field, value, message):
    with pytest.raises(sslplug.ConfigError, match=message):
        _Settings(**{field: value})


def test_validators_accept_their_bounds():
    _Settings(temperature=1e-9, crops=0, momentum=1.0, scale=(1.0, 1.0))
    _Settings(momentum=0.0)
