"""The one description of MobileNetV1 and MobileNetV2.

Pure Python: it imports neither jax nor torch. The Flax models (`flax_mobilenet`), the PyTorch
reference (`torch_ref`) and the weight converter (`parity`) all read the layer list built here, so
one table decides all three: channel counts, strides, which layers are depthwise, where the
residual connections are, and what each layer is called in either framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Arch = Literal["v1", "v2"]
ARCHS: tuple[str, ...] = ("v1", "v2")

# MobileNetV1, Table 1 of Howard et al. 2017 (arXiv 1704.04861): the 13 depthwise-separable blocks
# after the stem, as (output channels, depthwise stride). The paper prints s2 for the last
# depthwise layer, but its input and output are both 7x7: the stride there is 1 (following the
# printed s2 would end at 4x4). TensorFlow's reference implementation and timm use 1 too.
V1_STEM_CHANNELS = 32
V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)

# MobileNetV2, Table 2 of Sandler et al. 2018 (arXiv 1801.04381), as torchvision writes it:
# t expansion factor, c output channels, n repeats, s stride of the first repeat.
V2_STEM_CHANNELS = 32
V2_LAST_CHANNEL = 1280
V2_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
V2_DROPOUT = 0.2
ROUND_NEAREST = 8


def make_divisible(value: float, divisor: int = ROUND_NEAREST, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never down by over 10%."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class ConvBN:
    """A bias-free convolution followed by BatchNorm and, when `activation`, the nonlinearity."""

    role: str  # the paper's word: stem, depthwise, pointwise, expand, project, head
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    activation: bool
    torch_conv: str  # state-dict prefix of the convolution in the PyTorch model
    torch_bn: str  # state-dict prefix of its BatchNorm

    @property
    def padding(self) -> int:
        # Symmetric padding as PyTorch does it; 'SAME' would pad stride-2 layers on one side only.
        return (self.kernel_size - 1) // 2

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass(frozen=True)
class Block:
    """One entry of `features`: a stem or head ConvBN, a depthwise-separable or inverted-residual block."""

    name: str  # Flax module name; the PyTorch prefix is the same with '.' for '_'
    kind: Literal["conv_bn", "depthwise_separable", "inverted_residual"]
    layers: tuple[ConvBN, ...]
    residual: bool = False

    @property
    def in_channels(self) -> int:
        return self.layers[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_channels

    @property
    def stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)


@dataclass(frozen=True)
class Architecture:
    arch: Arch
    width_mult: float
    blocks: tuple[Block, ...]
    num_features: int  # channels entering the classifier
    num_classes: int
    dropout: float
    activation: Literal["relu6", "relu"]

    # The classifier is `Sequential(Dropout, Linear)` in torchvision, hence the `.1`.
    torch_classifier: str = "classifier.1"
    flax_classifier: str = "classifier"


def _conv_bn_block(index: int, role: str, cin: int, cout: int, kernel: int, stride: int) -> Block:
    # torchvision's Conv2dNormActivation: Sequential(conv, bn, act) -> keys `features.i.0`, `.1`.
    prefix = f"features.{index}"
    layer = ConvBN(role, cin, cout, kernel, stride, 1, True, f"{prefix}.0", f"{prefix}.1")
    return Block(f"features_{index}", "conv_bn", (layer,))


def _sequential_layers(prefix: str, specs: list[tuple]) -> tuple[ConvBN, ...]:
    """Keys as torchvision's blocks lay out `self.conv = Sequential(...)`.

    A layer with an activation is a Conv2dNormActivation (one index, `.0` conv and `.1` BN inside);
    a linear layer (V2's projection) is a bare Conv2d and a bare BatchNorm2d (two indices).
    """
    layers, index = [], 0
    for role, cin, cout, kernel, stride, groups, activation in specs:
        if activation:
            conv, bn, index = f"{prefix}.{index}.0", f"{prefix}.{index}.1", index + 1
        else:
            conv, bn, index = f"{prefix}.{index}", f"{prefix}.{index + 1}", index + 2
        layers.append(ConvBN(role, cin, cout, kernel, stride, groups, activation, conv, bn))
    return tuple(layers)


def mobilenet_v1(
    width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.0, activation: str = "relu6"
) -> Architecture:
    """MobileNetV1 with width multiplier alpha = `width_mult`.

    The resolution multiplier rho is the input size: the network is fully convolutional up to the
    global average pool and takes any input size (224 * rho in the paper).
    """
    _check(width_mult, num_classes, dropout)
    if activation not in ("relu6", "relu"):
        raise ValueError(f"activation must be 'relu6' or 'relu', got {activation!r}")
    width = lambda c: make_divisible(c * width_mult)  # noqa: E731
    cin = width(V1_STEM_CHANNELS)
    blocks = [_conv_bn_block(0, "stem", 3, cin, 3, 2)]
    for i, (c, s) in enumerate(V1_BLOCKS, start=1):
        cout = width(c)
        layers = _sequential_layers(
            f"features.{i}.conv",
            [("depthwise", cin, cin, 3, s, cin, True), ("pointwise", cin, cout, 1, 1, 1, True)],
        )
        blocks.append(Block(f"features_{i}", "depthwise_separable", layers))
        cin = cout
    return Architecture("v1", width_mult, tuple(blocks), cin, num_classes, dropout, activation)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, dropout: float = V2_DROPOUT) -> Architecture:
    """torchvision's `mobilenet_v2(width_mult=...)`, layer for layer and key for key."""
    _check(width_mult, num_classes, dropout)
    cin = make_divisible(V2_STEM_CHANNELS * width_mult)
    last_channel = make_divisible(V2_LAST_CHANNEL * max(1.0, width_mult))
    blocks = [_conv_bn_block(0, "stem", 3, cin, 3, 2)]
    for t, c, n, s in V2_BLOCKS:
        cout = make_divisible(c * width_mult)
        for repeat in range(n):
            index, stride = len(blocks), s if repeat == 0 else 1
            hidden = int(round(cin * t))
            specs = [("expand", cin, hidden, 1, 1, 1, True)] if t != 1 else []
            specs += [
                ("depthwise", hidden, hidden, 3, stride, hidden, True),
                ("project", hidden, cout, 1, 1, 1, False),
            ]
            layers = _sequential_layers(f"features.{index}.conv", specs)
            residual = stride == 1 and cin == cout
            blocks.append(Block(f"features_{index}", "inverted_residual", layers, residual))
            cin = cout
    blocks.append(_conv_bn_block(len(blocks), "head", cin, last_channel, 1, 1))
    return Architecture("v2", width_mult, tuple(blocks), last_channel, num_classes, dropout, "relu6")


def architecture(arch: str, width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> Architecture:
    if arch == "v1":
        return mobilenet_v1(width_mult, num_classes, **kwargs)
    if arch == "v2":
        return mobilenet_v2(width_mult, num_classes, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")


def _check(width_mult: float, num_classes: int, dropout: float) -> None:
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution with symmetric `padding` (PyTorch's formula)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def output_size(size: int, layer: ConvBN) -> int:
    """Spatial size after `layer`."""
    return conv_output_size(size, layer.kernel_size, layer.stride, layer.padding)


def total_stride(arch: Architecture) -> int:
    """How much the network downsamples: 32 for both. Inputs smaller than this reach the last
    stage as 1x1 maps made mostly of padding."""
    return math.prod(block.stride for block in arch.blocks)


def parameter_count(arch: Architecture) -> int:
    """Learned parameters: convolution weights, BN scale and bias, classifier weight and bias."""
    total = 0
    for block in arch.blocks:
        for layer in block.layers:
            total += layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel_size**2
            total += 2 * layer.out_channels
    return total + arch.num_features * arch.num_classes + arch.num_classes


def layer_table(arch: Architecture, resolution: int = 224) -> list[dict]:
    """One row per layer in the paper's columns, with parameters and multiply-adds.

    Multiply-adds count the convolutions and the classifier, as the papers do; BatchNorm and the
    activations are left out (they fold into the convolutions at inference).
    """
    rows, size = [], resolution
    for block in arch.blocks:
        for layer in block.layers:
            out = output_size(size, layer)
            per_group_in = layer.in_channels // layer.groups
            kind = "Conv dw" if layer.depthwise else "Conv"
            rows.append(
                {
                    "block": block.name,
                    "role": layer.role,
                    "type": f"{kind} / s{layer.stride}",
                    "filter": (layer.kernel_size, layer.kernel_size, per_group_in, layer.out_channels)
                    if not layer.depthwise
                    else (layer.kernel_size, layer.kernel_size, layer.in_channels, "dw"),
                    "input": (size, size, layer.in_channels),
                    "params": layer.out_channels * per_group_in * layer.kernel_size**2 + 2 * layer.out_channels,
                    "mult_adds": out * out * layer.out_channels * per_group_in * layer.kernel_size**2,
                }
            )
            size = out
    rows.append(
        {
            "block": "pool",
            "role": "pool",
            "type": "Avg Pool / s1",
            "filter": f"Pool {size}x{size}",
            "input": (size, size, arch.num_features),
            "params": 0,
            "mult_adds": 0,
        }
    )
    rows.append(
        {
            "block": arch.flax_classifier,
            "role": "classifier",
            "type": "FC / s1",
            "filter": (arch.num_features, arch.num_classes),
            "input": (1, 1, arch.num_features),
            "params": arch.num_features * arch.num_classes + arch.num_classes,
            "mult_adds": arch.num_features * arch.num_classes,
        }
    )
    return rows
