"""torch_ref's MobileNetV2 is torchvision's, key for key: weights load strictly both ways."""

from __future__ import annotations

import pytest
import torch

import torch_ref

torchvision = pytest.importorskip("torchvision")

V2_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)


@pytest.mark.parametrize("width", V2_WIDTHS)
def test_v2_state_dict_keys_and_shapes_equal_torchvision(width):
    ours = {k: tuple(v.shape) for k, v in torch_ref.MobileNetV2(width_mult=width).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in torchvision.models.mobilenet_v2(width_mult=width).state_dict().items()}
    assert list(ours.items()) == list(theirs.items())


@pytest.mark.parametrize("width", V2_WIDTHS)
def test_torchvision_weights_load_strictly_into_torch_ref_and_back(width):
    theirs = torchvision.models.mobilenet_v2(width_mult=width)
    ours = torch_ref.MobileNetV2(width_mult=width)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_torch_ref_computes_what_torchvision_computes():
    from parity.random_weights import random_torch_model

    theirs = random_torch_model("v2", 0.5, seed=31, reference="torchvision")
    ours = torch_ref.MobileNetV2(width_mult=0.5).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 65, 65, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        # The same modules in the same order: the same float32 operations, bit for bit.
        assert torch.equal(ours(x), theirs(x))


def test_v1_output_shape_at_any_resolution():
    model = torch_ref.MobileNetV1(num_classes=10, width_mult=0.25).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 97, 97)).shape == (1, 10)
