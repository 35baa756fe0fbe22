"""The batched colour jitter computes what torchvision's per-image operations compute."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from sslplug.augment import ColorJitter, rotate_hue


def _images(n: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    images = torch.rand(n, 3, 12, 12)
    images[0] = 0.5  # grey: no hue
    images[1, :, :6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # saturated primaries
    images[1, :, 6:] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    images[2] = 0.0
    return images


def test_rotate_hue_equals_torchvision_adjust_hue():
    images = _images()
    shift = torch.linspace(-0.5, 0.5, len(images))
    expected = torch.stack([TF.adjust_hue(img, s.item()) for img, s in zip(images, shift)])
    assert torch.allclose(rotate_hue(images, shift), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "name", "reference"),
    [
        ({"brightness": 0.4}, "brightness_factor", TF.adjust_brightness),
        ({"contrast": 0.4}, "contrast_factor", TF.adjust_contrast),
        ({"saturation": 0.4}, "saturation_factor", TF.adjust_saturation),
        ({"hue": 0.1}, "hue_factor", TF.adjust_hue),
    ],
)
def test_each_operation_equals_torchvision_with_the_drawn_factor(kwargs, name, reference):
    images = _images()
    jitter = ColorJitter(**kwargs)
    out = jitter(images)
    factors = jitter._params[name]
    expected = torch.stack([reference(img, f.item()) for img, f in zip(images, factors)])
    assert torch.allclose(out, expected, atol=1e-5)


def test_the_four_in_the_drawn_order_and_only_where_applied():
    images = _images(64)
    jitter = ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.5)
    out = jitter(images)
    params = jitter._params
    ops = [
        (TF.adjust_brightness, "brightness_factor"),
        (TF.adjust_contrast, "contrast_factor"),
        (TF.adjust_saturation, "saturation_factor"),
        (TF.adjust_hue, "hue_factor"),
    ]
    for i, image in enumerate(images):
        if not params["batch_prob"][i]:
            assert torch.allclose(out[i], image, atol=1e-5)
            continue
        for op in params["order"].tolist():
            fn, name = ops[op]
            image = fn(image, params[name][i].item())
        assert torch.allclose(out[i], image, atol=1e-5)
    assert 0 < params["batch_prob"].sum() < 64


def test_bad_hue_names_the_value():
    with pytest.raises(ValueError, match=r"hue 0\.7 must be in"):
        ColorJitter(hue=0.7)
