"""How the description pads: PyTorch's symmetric padding, TensorFlow's SAME (which depends on the
input size) and Keras's fixed ((top, bottom), (left, right)), per layer and per axis."""

from __future__ import annotations

import math

import pytest

import mobilenet_arch


def hugging_face_pad_total(size: int, kernel_size: int, stride: int) -> int:
    # transformers' apply_tf_padding, written as it is there.
    if size % stride == 0:
        return max(kernel_size - stride, 0)
    return max(kernel_size - size % stride, 0)


@pytest.mark.parametrize("kernel_size, stride", [(1, 1), (3, 1), (3, 2)])
def test_same_padding_is_tensorflows_for_every_size(kernel_size, stride):
    for size in range(1, 80):
        before, after = mobilenet_arch.tf_same_padding(size, kernel_size, stride)
        total = hugging_face_pad_total(size, kernel_size, stride)
        assert (before, after) == (total // 2, total - total // 2), size
        # SAME: the output has ceil(size / stride) pixels.
        assert mobilenet_arch.conv_output_size(size, kernel_size, stride, (before, after)) == math.ceil(size / stride)


def test_same_pads_a_stride_2_layer_after_only_at_even_sizes():
    assert mobilenet_arch.tf_same_padding(64, 3, 2) == (0, 1)
    assert mobilenet_arch.tf_same_padding(67, 3, 2) == (1, 1)  # where it equals PyTorch's
    assert mobilenet_arch.tf_same_padding(67, 3, 1) == (1, 1)


def test_each_axis_is_padded_for_its_own_size():
    layer = mobilenet_arch.mobilenet_v1(0.25, padding="same").blocks[0].layers[0]  # stem: 3x3, stride 2
    assert layer.pads(33, 64) == ((1, 1), (0, 1))


def test_symmetric_padding_is_pytorchs_whatever_the_size():
    layer = mobilenet_arch.mobilenet_v2(1.0).blocks[0].layers[0]
    assert layer.pad == "symmetric" and layer.padding == 1
    assert layer.pads(64, 67) == ((1, 1), (1, 1))


def test_a_fixed_padding_ignores_the_size():
    arch = mobilenet_arch.mobilenet_v1(0.25, padding=((0, 1), (0, 1)))
    assert {layer.pads(67, 33) for block in arch.blocks for layer in block.layers} == {((0, 1), (0, 1))}
    # Keras's MobileNet at an odd size: (n + 1 - 3) // 2 + 1, one pixel less than SAME's ceil(n / 2).
    assert mobilenet_arch.output_size(67, arch.blocks[0].layers[0]) == 33


def test_a_layer_that_pads_otherwise_has_no_symmetric_padding():
    layer = mobilenet_arch.mobilenet_v1(0.25, padding="same").blocks[1].layers[0]
    with pytest.raises(ValueError, match=r"pads 'same', not symmetrically: use pads\(height, width\)"):
        layer.padding


def test_padding_per_layer_is_asked_in_the_order_of_the_layers():
    # Keras bakes a ZeroPadding2D before each stride-2 depthwise layer: a rule may hand them out in turn.
    asked = []
    fixed = iter([((0, 1), (0, 1)), ((1, 1), (1, 1)), ((0, 1), (1, 1)), ((1, 1), (0, 1))])

    def padding(role, stride):
        asked.append((role, stride))
        return next(fixed) if role == "depthwise" and stride == 2 else "same"

    arch = mobilenet_arch.mobilenet_v1(0.25, padding=padding)
    layers = [layer for block in arch.blocks for layer in block.layers]
    assert asked == [(layer.role, layer.stride) for layer in layers]
    assert [layer.pad for layer in layers if layer.stride == 2 and layer.depthwise] == [
        ((0, 1), (0, 1)), ((1, 1), (1, 1)), ((0, 1), (1, 1)), ((1, 1), (0, 1))
    ]
    assert layers[0].pad == "same"


def test_a_fixed_padding_is_stored_as_tuples():
    # Read from a Keras config (JSON lists), it must still be hashable: Flax modules hold it.
    arch = mobilenet_arch.mobilenet_v1(0.25, padding=[[0, 1], [0, 1]])
    assert arch.blocks[0].layers[0].pad == ((0, 1), (0, 1))
    hash(arch)


@pytest.mark.parametrize(
    "padding", ["valid", "SAME", ((0, 1),), ((0, -1), (0, 1)), ((0, 1), (1, -1)), ((0, 1.5), (0, 1)), 1]
)
def test_other_paddings_are_refused_with_what_is_accepted(padding):
    accepted = r"padding must be 'symmetric', 'same' or \(\(top, bottom\), \(left, right\)\)"
    with pytest.raises(ValueError, match=accepted):
        mobilenet_arch.mobilenet_v2(0.35, padding=padding)


def test_the_layer_table_follows_same_padding():
    # At 67 px SAME gives ceil(n / 2) at every stride 2: 34, 17, 9, 5, 3.
    rows = mobilenet_arch.layer_table(mobilenet_arch.mobilenet_v2(0.35, padding="same"), 67)
    assert rows[-2]["input"][:2] == (3, 3)
    keras = lambda role, stride: ((0, 1), (0, 1)) if role == "depthwise" and stride == 2 else "same"  # noqa: E731
    rows = mobilenet_arch.layer_table(mobilenet_arch.mobilenet_v1(0.25, padding=keras), 67)
    assert rows[-2]["input"][:2] == (2, 2)  # 34 (the stem is SAME), 17, 8, 4, 2
