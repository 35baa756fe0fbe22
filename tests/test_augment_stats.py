"""The kornia recipes draw what their settings say: crop scales and aspect ratios, flip, jitter,
grayscale, blur and solarisation rates and ranges, measured on the parameters each pipeline
sampled for a large batch. Any change made for speed must keep these."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
import torchvision.transforms as T

from sslplug.augment import ColorJitter, byol_recipe, crop_flip_recipe, simclr_recipe

N = 4096


def _sampled(pipeline: torch.nn.Module) -> dict[type, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    pipeline(torch.rand(N, 3, 32, 32))
    steps = [getattr(m, "uniform", m) for m in pipeline]  # sslplug's crop wraps kornia's
    return {type(m): m._params for m in steps if getattr(m, "_params", None) is not None}


def _rate(params: dict[str, torch.Tensor]) -> float:
    return params["batch_prob"].float().mean().item()


def _check_crop(params: dict[str, torch.Tensor], scale: tuple[float, float]) -> None:
    src = params["src"]  # corners (top-left, top-right, bottom-right, bottom-left) as (x, y)
    width = src[:, 1, 0] - src[:, 0, 0] + 1
    height = src[:, 2, 1] - src[:, 1, 1] + 1
    area = width * height / (32 * 32)
    assert area.min() >= scale[0] - 0.02 and area.max() <= scale[1] + 1e-6
    ratio = width / height
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    # The reference: torchvision's sampler, which the published recipes used. Draws that do not
    # fit the image are redrawn, so the mean area is below the middle of ``scale``.
    torch.manual_seed(1)
    reference = torch.tensor(
        [
            h * w / (32 * 32)
            for _, _, h, w in (
                T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), scale, (3 / 4, 4 / 3))
                for _ in range(N)
            )
        ]
    )
    assert area.mean().item() == pytest.approx(reference.mean().item(), abs=0.02)
    assert area.std().item() == pytest.approx(reference.std().item(), abs=0.02)


@pytest.mark.parametrize("view", [0, 1])
def test_byol_recipe_statistics(view):
    params = _sampled(byol_recipe(32)[view])
    _check_crop(params[K.RandomResizedCrop], (0.08, 1.0))
    assert _rate(params[K.RandomHorizontalFlip]) == pytest.approx(0.5, abs=0.04)
    jitter = params[ColorJitter]
    assert _rate(jitter) == pytest.approx(0.8, abs=0.04)
    applied = jitter["batch_prob"].bool()
    for key, lo, hi in (
        ("brightness_factor", 0.6, 1.4),
        ("contrast_factor", 0.6, 1.4),
        ("saturation_factor", 0.8, 1.2),
        ("hue_factor", -0.1, 0.1),
    ):
        values = jitter[key][applied]
        assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, key
        assert values.mean().item() == pytest.approx((lo + hi) / 2, abs=0.03), key
        assert values.std().item() == pytest.approx((hi - lo) / 12**0.5, rel=0.1), key
    assert _rate(params[K.RandomGrayscale]) == pytest.approx(0.2, abs=0.04)
    blur = params[K.RandomGaussianBlur]
    assert _rate(blur) == pytest.approx((1.0, 0.1)[view], abs=0.04)
    sigma = blur["sigma"]
    assert sigma.min() >= 0.1 - 1e-6 and sigma.max() <= 2.0 + 1e-6
    if view == 0:
        assert K.RandomSolarize not in params
    else:
        assert _rate(params[K.RandomSolarize]) == pytest.approx(0.2, abs=0.04)


def test_simclr_recipe_statistics():
    params = _sampled(simclr_recipe(32)[0])
    _check_crop(params[K.RandomResizedCrop], (0.08, 1.0))
    jitter = params[ColorJitter]
    assert _rate(jitter) == pytest.approx(0.8, abs=0.04)
    brightness = jitter["brightness_factor"][jitter["batch_prob"].bool()]
    assert brightness.min() >= 0.6 - 1e-6 and brightness.max() <= 1.4 + 1e-6
    assert _rate(params[K.RandomGrayscale]) == pytest.approx(0.2, abs=0.04)
    assert K.RandomGaussianBlur not in params and K.RandomSolarize not in params


def test_crop_flip_recipe_statistics():
    params = _sampled(crop_flip_recipe(32, (0.35, 1.0)))
    _check_crop(params[K.RandomResizedCrop], (0.35, 1.0))
    assert _rate(params[K.RandomHorizontalFlip]) == pytest.approx(0.5, abs=0.04)
