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


def test_v1_head_is_a_conv_bn_relu6_before_pooling():
    model = torch_ref.MobileNetV1(num_classes=10, width_mult=0.25, head=True).eval()
    head = model.features[14]
    assert [type(m).__name__ for m in head] == ["Conv2d", "BatchNorm2d", "ReLU6"]
    assert head[0].weight.shape == (1024, 256, 1, 1) and model.classifier[1].in_features == 1024
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("size, expected", [(64, 32), (67, 34)])
def test_same_padding_gives_tensorflows_sizes(size, expected):
    model = torch_ref.MobileNetV2(num_classes=10, width_mult=0.35, padding="same").eval()
    with torch.no_grad():
        assert model.features[0](torch.zeros(1, 3, size, size)).shape[-1] == expected  # ceil(n / 2)


def test_depth_multiplied_v2_keeps_torchvisions_numbering():
    model = torch_ref.MobileNetV2(width_mult=1.2, depth_mult=1.4, fix_stem_head=True)
    assert len(model.features) == 1 + 26 + 1  # stem, 1+3+5+6+5+5+1 blocks, head
    assert model.features[0][0].weight.shape[0] == 32 and model.features[27][0].weight.shape[0] == 1280
