"""The one description of MobileNetV1 and MobileNetV2.

Pure Python: it imports neither jax nor torch. The Flax models (`flax_mobilenet`), the PyTorch
reference (`torch_ref`) and the weight converter (`parity`) all read the layer list built here, so
one table decides all three: channel counts, strides, which layers are depthwise, where the
residual connections are, how each layer pads, BatchNorm's epsilon, and what each layer is called
in either framework.

The models are built from explicit channel counts (`mobilenet_v1_from_channels`,
`mobilenet_v2_from_blocks`), which is what a checkpoint's shapes give: any width and any depth.
Each library's rule for turning a width multiplier into channels is a small function beside them
(`mobilenet_v2_channels` for torchvision and timm, `hf_v2_channels`, `keras_v2_channels`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Union

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
# timm's optional 1x1 head convolution before pooling (mobilenetv1_100h): 1024 channels at width 1.
V1_HEAD_CHANNELS = 1024

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
# torchvision's `mobilenet_v2(dropout=0.2)`, before the classifier. timm (`drop_rate`) defaults to
# 0, Hugging Face to its config's `classifier_dropout_prob`, Keras's MobileNetV2 has none.
V2_DROPOUT = 0.2
ROUND_NEAREST = 8
BN_EPSILON = 1e-5  # PyTorch's BatchNorm2d default
TF_BN_EPSILON = 1e-3  # TensorFlow's MobileNets' (Google's checkpoints, Keras, transformers' default)

# How a convolution pads its input: "symmetric" is PyTorch's (k - 1) // 2 on every side; "same" is
# TensorFlow's SAME, which depends on the input size (at stride 2 the odd pixel goes after, and
# none goes before at even sizes); a fixed ((top, bottom), (left, right)) is what Keras bakes into
# a ZeroPadding2D layer when the model is built.
Padding = Union[str, tuple[tuple[int, int], tuple[int, int]]]
PADDING_STYLES: tuple[str, ...] = ("symmetric", "same")
# One padding for every layer, or a function (role, stride) -> padding, called once per layer in
# the order of the layers.
PaddingRule = Union[Padding, Callable[[str, int], Padding]]


def make_divisible(value: float, divisor: int = ROUND_NEAREST, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never down by over 10%."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis, (before, after): the output has ceil(size / stride)
    pixels, and the odd pixel of padding goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def check_padding(padding: Padding) -> Padding:
    """`padding` as the description stores it (a fixed padding as a tuple of int pairs), or a
    ValueError saying what is accepted."""
    if isinstance(padding, str):
        if padding in PADDING_STYLES:
            return padding
    else:
        try:
            (top, bottom), (left, right) = padding
            fixed = ((int(top), int(bottom)), (int(left), int(right)))
        except (TypeError, ValueError):
            fixed = None
        if fixed is not None and fixed == tuple(map(tuple, padding)) and min(*fixed[0], *fixed[1]) >= 0:
            return fixed
    raise ValueError(
        f"padding must be 'symmetric', 'same' or ((top, bottom), (left, right)) of non-negative ints, got {padding!r}"
    )


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
    pad: Padding = "symmetric"

    @property
    def padding(self) -> int:
        """The symmetric padding, (kernel_size - 1) // 2 on every side, of a "symmetric" layer."""
        if self.pad != "symmetric":
            raise ValueError(f"{self.role} layer pads {self.pad!r}, not symmetrically: use pads(height, width)")
        return (self.kernel_size - 1) // 2

    def pads(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) for an input of `height` x `width`."""
        if self.pad == "symmetric":
            p = (self.kernel_size - 1) // 2
            return (p, p), (p, p)
        if self.pad == "same":
            return (
                tf_same_padding(height, self.kernel_size, self.stride),
                tf_same_padding(width, self.kernel_size, self.stride),
            )
        return self.pad

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass(frozen=True)
class Block:
    """One entry of `features`: a stem or head ConvBN, a depthwise-separable or inverted-residual block.

    `stage` and `repeat` place it in the paper's table (a stage is a row of V2's table, or a run of
    V1's blocks at one resolution; timm names its blocks `blocks.{stage}.{repeat}`). The stem is
    stage -1 and the head the stage after the last, so the blocks are in (stage, repeat) order.
    """

    name: str  # Flax module name; the PyTorch prefix is the same with '.' for '_'
    kind: Literal["conv_bn", "depthwise_separable", "inverted_residual"]
    layers: tuple[ConvBN, ...]
    residual: bool = False
    stage: int = -1
    repeat: int = 0

    @property
    def in_channels(self) -> int:
        return self.layers[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_channels

    @property
    def stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)


# What a dense layer of the head may apply after itself: both frameworks have each of these.
DENSE_ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "gelu", "silu", "tanh", "sigmoid")
# What the network returns after its last layer: logits, or Keras's default softmax probabilities.
OUTPUTS: tuple[str, ...] = ("none", "softmax")


@dataclass(frozen=True)
class Dense:
    """One dense layer of the head: dropout before it, `units` outputs, then `activation` (None:
    linear, as the output layer is).

    The names are those a source gave the layer, kept so that writing back to that library puts
    it where its model has it; "" where no source named it (each layout then has its default)."""

    units: int
    dropout: float = 0.0
    activation: Optional[str] = None
    torch_name: str = ""  # state-dict prefix in a PyTorch model: "classifier.3", "fc", "head.1"
    keras_name: str = ""  # layer name in a Keras model: "dense_1", "predictions"


@dataclass(frozen=True)
class Head:
    """After the last block: global average pooling, then `layers` in order (none: the model
    returns the pooled features), then the `output` activation ("none": logits; "softmax":
    probabilities, as Keras's applications return)."""

    layers: tuple[Dense, ...] = ()
    output: str = "none"

    @property
    def num_classes(self) -> int:
        return self.layers[-1].units if self.layers else 0

    @property
    def hidden(self) -> tuple[Dense, ...]:
        return self.layers[:-1]

    @property
    def flax_names(self) -> tuple[str, ...]:
        """The Flax module of each layer: `hidden_0`, `hidden_1`, ..., then `classifier`."""
        return tuple(f"hidden_{i}" for i in range(len(self.layers) - 1)) + (("classifier",) if self.layers else ())

    @property
    def torch_names(self) -> tuple[str, ...]:
        """Each layer's state-dict prefix: the source's names where it gave them all, else
        torchvision's `classifier = Sequential(Dropout, Linear, activation, [Dropout,] Linear...)`
        numbering (a single layer is `classifier.1`; the transfer-learning recipe's
        `Dropout, Linear(256), ReLU, Linear(n)` is `classifier.1`, `classifier.3`)."""
        if self.layers and all(layer.torch_name for layer in self.layers):
            return tuple(layer.torch_name for layer in self.layers)
        return tuple(name for name, layer in sequential_modules(self) if layer is not None)

    def describe(self) -> str:
        """'dropout 0.5 -> dense 256 (relu) -> dense 4', 'no classifier (pooled features)'."""
        if not self.layers:
            return "no classifier (pooled features)"
        parts = []
        for layer in self.layers:
            if layer.dropout:
                parts.append(f"dropout {layer.dropout:g}")
            parts.append(f"dense {layer.units}" + (f" ({layer.activation})" if layer.activation else ""))
        out = " -> ".join(parts)
        return out + (f" ({self.output})" if self.output != "none" else "")


def sequential_modules(head: Head) -> list[tuple[str, Optional[Dense]]]:
    """torchvision's numbering of the head as one `classifier` Sequential: (name, layer) for each
    Linear, (name, None) for the Dropout and activation modules between them. A Dropout precedes
    the first Linear always (torchvision's `Dropout(p=0.2), Linear`), the others where they drop."""
    out: list[tuple[str, Optional[Dense]]] = []
    for i, layer in enumerate(head.layers):
        if i == 0 or layer.dropout:
            out.append((f"classifier.{len(out)}", None))
        out.append((f"classifier.{len(out)}", layer))
        if layer.activation:
            out.append((f"classifier.{len(out)}", None))
    return out


def make_head(
    num_classes: int,
    dropout: float = 0.0,
    hidden: Sequence[int] = (),
    hidden_activation: str = "relu",
    output: str = "none",
) -> Head:
    """The head of `hidden` dense layers (each with `hidden_activation`) and a linear output layer
    of `num_classes` (0: no head), `dropout` before the first layer: torchvision's classifier with
    no `hidden`, the transfer-learning recipe's `Dropout, Linear(256), ReLU, Linear(n)` with
    `hidden=(256,)`."""
    if not num_classes:
        if hidden:
            raise ValueError(f"hidden layers {tuple(hidden)} need an output layer: num_classes must be at least 1")
        return Head((), output)
    units = [*hidden, num_classes]
    layers = tuple(
        Dense(int(n), dropout if i == 0 else 0.0, hidden_activation if i < len(units) - 1 else None) for i, n in enumerate(units)
    )
    return check_head(Head(layers, output))


def check_head(head: Head) -> Head:
    """`head`, or a ValueError saying what is wrong with it."""
    if head.output not in OUTPUTS:
        raise ValueError(f"the head's output must be one of {', '.join(OUTPUTS)}, got {head.output!r}")
    for layer in head.layers:
        if not (isinstance(layer.units, int) and layer.units >= 1):
            raise ValueError(f"a dense layer's units must be a positive integer, got {layer.units!r}")
        if not 0.0 <= layer.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {layer.dropout}")
        if layer.activation is not None and layer.activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"a dense layer's activation must be one of {', '.join(DENSE_ACTIVATIONS)} or None, got {layer.activation!r}")
    return head


@dataclass(frozen=True)
class Architecture:
    arch: Arch
    width_mult: float  # a label: the builders from channels take stem / 32 unless told
    blocks: tuple[Block, ...]
    num_features: int  # channels entering the head
    head: Head
    activation: Literal["relu6", "relu"]
    bn_epsilon: float = BN_EPSILON

    @property
    def num_classes(self) -> int:
        """The output layer's units; 0: no head, the model returns the pooled features (timm's num_classes=0)."""
        return self.head.num_classes

    @property
    def dropout(self) -> float:
        """The head's dropout: the first that drops (the one before torchvision's classifier)."""
        return next((layer.dropout for layer in self.head.layers if layer.dropout), 0.0)

    @property
    def flax_classifier(self) -> str:
        return "classifier"

    @property
    def torch_classifier(self) -> str:
        """The output layer's state-dict prefix (torchvision's `classifier.1`)."""
        return self.head.torch_names[-1] if self.head.layers else "classifier.1"

    @property
    def stage_depths(self) -> tuple[int, ...]:
        """Blocks per stage of the table, stem and head left out (V2 at depth 1: 1, 2, 3, 4, 3, 3, 1)."""
        stages = [b.stage for b in self.blocks if b.layers[0].role not in ("stem", "head")]
        return tuple(stages.count(s) for s in sorted(set(stages)))

    def __repr__(self) -> str:
        # One line: the full dataclass repr of every layer runs to 12 KB.
        return f"Architecture({describe(self)})"


def with_head(arch: Architecture, head: Head) -> Architecture:
    return dataclasses.replace(arch, head=check_head(head))


def with_dropout(arch: Architecture, dropout: float) -> Architecture:
    """`arch` with `dropout` where its head drops (before the first layer if nowhere)."""
    layers = list(arch.head.layers)
    if not layers:
        return arch
    at = next((i for i, layer in enumerate(layers) if layer.dropout), 0)
    layers[at] = dataclasses.replace(layers[at], dropout=dropout)
    return with_head(arch, dataclasses.replace(arch.head, layers=tuple(layers)))


def with_classes(arch: Architecture, num_classes: int) -> Architecture:
    """`arch` with an output layer of `num_classes` in place of its own (the hidden layers kept,
    and the names the source gave every layer); 0: no head at all."""
    if not num_classes:
        return with_head(arch, Head((), arch.head.output))
    if not arch.head.layers:
        return with_head(arch, make_head(num_classes, output=arch.head.output))
    last = arch.head.layers[-1]
    if last.units == num_classes:
        return arch
    # The names stay: they say where the layer sits in the source's model, not how many classes it has.
    return with_head(arch, dataclasses.replace(arch.head, layers=arch.head.hidden + (dataclasses.replace(last, units=num_classes),)))


def describe(arch: "Architecture") -> str:
    """The architecture in one line: version, width, depth where not the paper's, classes,
    padding in words, BatchNorm epsilon."""
    depth = "" if arch.arch == "v1" or arch.stage_depths == V2_STAGE_DEPTHS else f", depth {list(arch.stage_depths)}"
    return (
        f"MobileNet{arch.arch.upper()} width {arch.width_mult:g}{depth}, head {arch.head.describe()}, "
        f"{padding_in_words(arch)}, BatchNorm epsilon {arch.bn_epsilon:g}"
    )


def padding_in_words(arch: "Architecture") -> str:
    pads = {layer.pad for block in arch.blocks for layer in block.layers if layer.kernel_size > 1}
    fixed = sorted(str(p) for p in pads if not isinstance(p, str))
    if pads == {"symmetric"}:
        return "PyTorch padding (symmetric)"
    if fixed and all(p == "same" or not isinstance(p, str) for p in pads):
        return f"TensorFlow padding (SAME, Keras's fixed {', '.join(fixed)} at stride 2)"
    if pads == {"same"}:
        return "TensorFlow padding (SAME)"
    return "padding " + ", ".join(sorted(map(str, pads)))


class V1Channels(NamedTuple):
    """What `mobilenet_v1_from_channels` needs: the stem's and the 13 pointwise layers' output
    channels, and the head convolution's (None: no head)."""

    stem: int
    outs: tuple[int, ...]
    head: Optional[int] = None


class V2Channels(NamedTuple):
    """What `mobilenet_v2_from_blocks` needs: the stem's channels, per block (expanded channels or
    None for no expansion layer, output channels, stride, stage, repeat), and the head's channels."""

    stem: int
    blocks: tuple[tuple[Optional[int], int, int, int, int], ...]
    head: int


def stage_positions(depths: Sequence[int]) -> list[tuple[int, int]]:
    """(stage, repeat) of each block, for `depths` blocks per stage."""
    return [(stage, repeat) for stage, n in enumerate(depths) for repeat in range(n)]


def _v1_stage_depths() -> tuple[int, ...]:
    depths: list[int] = []
    for i, (_, stride) in enumerate(V1_BLOCKS):
        if i == 0 or stride == 2:
            depths.append(0)
        depths[-1] += 1
    return tuple(depths)


# V1's stages as timm groups Table 1, a new one at each stride 2: 1, 2, 2, 6, 2 blocks.
V1_STAGE_DEPTHS: tuple[int, ...] = _v1_stage_depths()
V2_STAGE_DEPTHS: tuple[int, ...] = tuple(n for _, _, n, _ in V2_BLOCKS)


def _padding_rule(padding: PaddingRule) -> Callable[[str, int], Padding]:
    if callable(padding):
        return lambda role, stride: check_padding(padding(role, stride))
    fixed = check_padding(padding)
    return lambda role, stride: fixed


def _conv_bn_block(index: int, role: str, cin: int, cout: int, kernel: int, stride: int, pad, stage: int = -1) -> Block:
    # torchvision's Conv2dNormActivation: Sequential(conv, bn, act) -> keys `features.i.0`, `.1`.
    prefix = f"features.{index}"
    layer = ConvBN(role, cin, cout, kernel, stride, 1, True, f"{prefix}.0", f"{prefix}.1", pad(role, stride))
    return Block(f"features_{index}", "conv_bn", (layer,), stage=stage)


def _sequential_layers(prefix: str, specs: list[tuple], pad) -> tuple[ConvBN, ...]:
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
        layers.append(ConvBN(role, cin, cout, kernel, stride, groups, activation, conv, bn, pad(role, stride)))
    return tuple(layers)


def mobilenet_v1_from_channels(
    stem: int,
    outs: Sequence[int],
    num_classes: int = 1000,
    *,
    head: int | None = None,
    dropout: float = 0.0,
    activation: str = "relu6",
    padding: PaddingRule = "symmetric",
    bn_epsilon: float = BN_EPSILON,
    width_mult: float | None = None,
    **head_kw,
) -> Architecture:
    """MobileNetV1 with `stem` channels after the stem and `outs[i]` after block i + 1's pointwise
    layer (13 blocks, strides from Table 1); `head`: a 1x1 convolution with BN and activation
    before pooling (timm's mobilenetv1_100h). `head_kw`: `_head`'s (hidden, hidden_activation,
    output, or a whole `classifier` Head)."""
    _check(activation, bn_epsilon)
    classifier = _head(num_classes, dropout, **head_kw)
    outs = tuple(outs)
    if len(outs) != len(V1_BLOCKS):
        raise ValueError(
            f"MobileNetV1 has {len(V1_BLOCKS)} depthwise-separable blocks: got {len(outs)} output channel counts"
        )
    _check_channels(stem, *outs, *([head] if head is not None else []))
    pad = _padding_rule(padding)
    blocks = [_conv_bn_block(0, "stem", 3, stem, 3, 2, pad)]
    cin = stem
    positions = stage_positions(V1_STAGE_DEPTHS)
    for i, ((_, s), cout, (stage, repeat)) in enumerate(zip(V1_BLOCKS, outs, positions), start=1):
        layers = _sequential_layers(
            f"features.{i}.conv",
            [("depthwise", cin, cin, 3, s, cin, True), ("pointwise", cin, cout, 1, 1, 1, True)],
            pad,
        )
        blocks.append(Block(f"features_{i}", "depthwise_separable", layers, stage=stage, repeat=repeat))
        cin = cout
    if head is not None:
        blocks.append(_conv_bn_block(len(blocks), "head", cin, head, 1, 1, pad, stage=len(V1_STAGE_DEPTHS)))
        cin = head
    width = stem / V1_STEM_CHANNELS if width_mult is None else width_mult
    return Architecture("v1", width, tuple(blocks), cin, classifier, activation, bn_epsilon=bn_epsilon)


def mobilenet_v2_from_blocks(
    stem: int,
    blocks: Sequence[tuple[Optional[int], int, int, int, int]],
    head: int,
    num_classes: int = 1000,
    *,
    dropout: float = V2_DROPOUT,
    activation: str = "relu6",
    padding: PaddingRule = "symmetric",
    bn_epsilon: float = BN_EPSILON,
    stem_residual: bool = True,
    width_mult: float | None = None,
    **head_kw,
) -> Architecture:
    """MobileNetV2 from its channels: `stem`, then per inverted residual (expanded channels or
    None for none, output channels, stride, stage, repeat), then the `head` 1x1 convolution.

    A block adds its input when its stride is 1 and its channels are unchanged (Sandler et al.,
    Section 3.3); `stem_residual=False` denies it to the first block, as Hugging Face's stem does.
    `head_kw`: `_head`'s (hidden, hidden_activation, output, or a whole `classifier` Head).
    """
    _check(activation, bn_epsilon)
    classifier = _head(num_classes, dropout, **head_kw)
    specs = [tuple(b) for b in blocks]
    if not specs or any(len(b) != 5 for b in specs):
        raise ValueError(
            "blocks must be (expanded channels or None, output channels, stride, stage, repeat) per block, at least one"
        )
    _check_channels(stem, head, *(c for hidden, cout, *_ in specs for c in (hidden, cout) if c is not None))
    pad = _padding_rule(padding)
    features = [_conv_bn_block(0, "stem", 3, stem, 3, 2, pad)]
    cin = stem
    for index, (hidden, cout, stride, stage, repeat) in enumerate(specs, start=1):
        layer_specs = [("expand", cin, hidden, 1, 1, 1, True)] if hidden is not None else []
        h = cin if hidden is None else hidden
        layer_specs += [("depthwise", h, h, 3, stride, h, True), ("project", h, cout, 1, 1, 1, False)]
        layers = _sequential_layers(f"features.{index}.conv", layer_specs, pad)
        residual = stride == 1 and cin == cout and (stem_residual or index > 1)
        features.append(Block(f"features_{index}", "inverted_residual", layers, residual, stage, repeat))
        cin = cout
    last_stage = max(stage for *_, stage, _ in specs)
    features.append(_conv_bn_block(len(features), "head", cin, head, 1, 1, pad, stage=last_stage + 1))
    width = stem / V2_STEM_CHANNELS if width_mult is None else width_mult
    return Architecture("v2", width, tuple(features), head, classifier, activation, bn_epsilon=bn_epsilon)


# ---------------------------------------------------------------- each library's channel rules


def mobilenet_v1_channels(width_mult: float, *, head: bool = False, fix_stem_head: bool = False) -> V1Channels:
    """timm's `_gen_mobilenet_v1` (torchvision has no V1): every count `make_divisible(c * width)`;
    the head `max(1024, make_divisible(1024 * width))`; `fix_stem_head` keeps stem 32 and head 1024."""
    _check_width(width_mult)
    width = lambda c: make_divisible(c * width_mult)  # noqa: E731
    stem = V1_STEM_CHANNELS if fix_stem_head else width(V1_STEM_CHANNELS)
    head_channels = None
    if head:
        head_channels = V1_HEAD_CHANNELS if fix_stem_head else max(V1_HEAD_CHANNELS, width(V1_HEAD_CHANNELS))
    return V1Channels(stem, tuple(width(c) for c, _ in V1_BLOCKS), head_channels)


def scale_depths(depth_mult: float, fix_first_last: bool = False) -> tuple[int, ...]:
    """timm's `_scale_stage_depth` on V2's table: ceil(n * depth_mult) blocks per stage, the first
    and last stages unscaled when `fix_first_last`."""
    if not depth_mult > 0:
        raise ValueError(f"depth_mult must be positive, got {depth_mult}")
    last = len(V2_STAGE_DEPTHS) - 1
    return tuple(
        n if fix_first_last and i in (0, last) else int(math.ceil(n * depth_mult))
        for i, n in enumerate(V2_STAGE_DEPTHS)
    )


def mobilenet_v2_channels(width_mult: float, *, depth_mult: float = 1.0, fix_stem_head: bool = False) -> V2Channels:
    """torchvision's `mobilenet_v2(width_mult=...)` and timm's `_gen_mobilenet_v2`: counts
    `make_divisible(c * width)`, expanded `round(cin * t)`, head `make_divisible(1280 * max(1, width))`.
    timm's `depth_mult` and `fix_stem_head` (mobilenetv2_110d, _120d): ceil(n * depth) repeats per
    stage, with stem 32, head 1280 and the first and last stages' repeats kept."""
    _check_width(width_mult)
    stem = V2_STEM_CHANNELS if fix_stem_head else make_divisible(V2_STEM_CHANNELS * width_mult)
    head = V2_LAST_CHANNEL if fix_stem_head else make_divisible(V2_LAST_CHANNEL * max(1.0, width_mult))
    blocks, cin = [], stem
    for stage, ((t, c, _, s), n) in enumerate(zip(V2_BLOCKS, scale_depths(depth_mult, fix_stem_head))):
        cout = make_divisible(c * width_mult)
        for repeat in range(n):
            blocks.append((int(round(cin * t)) if t != 1 else None, cout, s if repeat == 0 else 1, stage, repeat))
            cin = cout
    return V2Channels(stem, tuple(blocks), head)


def hf_v1_channels(depth_multiplier: float, min_depth: int = 8) -> V1Channels:
    """Hugging Face's MobileNetV1Config: `max(int(c * depth_multiplier), min_depth)`, truncated, no
    multiple of 8 (0.3 -> 9, 19, 38, ...)."""
    _check_width(depth_multiplier)
    width = lambda c: max(int(c * depth_multiplier), min_depth)  # noqa: E731
    return V1Channels(width(V1_STEM_CHANNELS), tuple(width(c) for c, _ in V1_BLOCKS))


def hf_v2_channels(
    depth_multiplier: float,
    depth_divisible_by: int = 8,
    min_depth: int = 8,
    expand_ratio: float = 6.0,
    finegrained_output: bool = True,
    first_layer_is_expansion: bool = True,
) -> V2Channels:
    """Hugging Face's MobileNetV2Config: counts `make_divisible(int(round(c * depth_multiplier)),
    depth_divisible_by, min_depth)`, expanded the same on `round(cin * expand_ratio)`; the head stays
    1280 below width 1 when `finegrained_output`; `first_layer_is_expansion=False` gives the first
    block an expansion layer of the stem's channels."""
    _check_width(depth_multiplier)
    rule = lambda c: make_divisible(int(round(c * depth_multiplier)), depth_divisible_by, min_depth)  # noqa: E731
    stem = rule(V2_STEM_CHANNELS)
    blocks, cin = [], stem
    for stage, (t, c, n, s) in enumerate(V2_BLOCKS):
        for repeat in range(n):
            if stage == 0:
                hidden = None if first_layer_is_expansion else stem
            else:
                hidden = make_divisible(int(round(cin * expand_ratio)), depth_divisible_by, min_depth)
            blocks.append((hidden, rule(c), s if repeat == 0 else 1, stage, repeat))
            cin = rule(c)
    head = V2_LAST_CHANNEL if finegrained_output and depth_multiplier < 1.0 else rule(V2_LAST_CHANNEL)
    return V2Channels(stem, tuple(blocks), head)


def keras_v1_channels(alpha: float) -> V1Channels:
    """Keras's `MobileNet(alpha=...)`: `int(c * alpha)`, no minimum, no rounding."""
    _check_width(alpha)
    return V1Channels(int(V1_STEM_CHANNELS * alpha), tuple(int(c * alpha) for c, _ in V1_BLOCKS))


def keras_v2_channels(alpha: float) -> V2Channels:
    """Keras's `MobileNetV2(alpha=...)`: stem `make_divisible(32 * alpha)`, outputs
    `make_divisible(int(c * alpha))` (truncated first), expanded exactly `t * cin`, head
    `make_divisible(1280 * alpha)` above width 1, else 1280."""
    _check_width(alpha)
    stem = make_divisible(V2_STEM_CHANNELS * alpha)
    blocks, cin = [], stem
    for stage, (t, c, n, s) in enumerate(V2_BLOCKS):
        cout = make_divisible(int(c * alpha))
        for repeat in range(n):
            blocks.append((t * cin if stage > 0 else None, cout, s if repeat == 0 else 1, stage, repeat))
            cin = cout
    head = make_divisible(V2_LAST_CHANNEL * alpha) if alpha > 1.0 else V2_LAST_CHANNEL
    return V2Channels(stem, tuple(blocks), head)


# ---------------------------------------------------------------- the models by width


def mobilenet_v1(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.0,
    activation: str = "relu6",
    *,
    head: bool = False,
    fix_stem_head: bool = False,
    padding: PaddingRule = "symmetric",
    bn_epsilon: float = BN_EPSILON,
    **head_kw,
) -> Architecture:
    """MobileNetV1 with width multiplier alpha = `width_mult`, channels by `mobilenet_v1_channels`.

    The resolution multiplier rho is the input size: the network is fully convolutional up to the
    global average pool and takes any input size (224 * rho in the paper). `head_kw`: the
    classifier's further layers (`hidden=(256,)`, `hidden_activation`, `output="softmax"`, or a
    whole `classifier=Head(...)`).
    """
    stem, outs, head_channels = mobilenet_v1_channels(width_mult, head=head, fix_stem_head=fix_stem_head)
    return mobilenet_v1_from_channels(
        stem, outs, num_classes, head=head_channels, dropout=dropout, activation=activation,
        padding=padding, bn_epsilon=bn_epsilon, width_mult=width_mult, **head_kw,
    )


def mobilenet_v2(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = V2_DROPOUT,
    *,
    depth_mult: float = 1.0,
    fix_stem_head: bool = False,
    padding: PaddingRule = "symmetric",
    bn_epsilon: float = BN_EPSILON,
    **head_kw,
) -> Architecture:
    """torchvision's `mobilenet_v2(width_mult=...)`, layer for layer and key for key; with
    `depth_mult` and `fix_stem_head`, timm's (mobilenetv2_110d: width 1.1, depth 1.2, fixed).
    `head_kw`: the classifier's further layers, as `mobilenet_v1`'s."""
    stem, blocks, head = mobilenet_v2_channels(width_mult, depth_mult=depth_mult, fix_stem_head=fix_stem_head)
    return mobilenet_v2_from_blocks(
        stem, blocks, head, num_classes, dropout=dropout, padding=padding, bn_epsilon=bn_epsilon, width_mult=width_mult, **head_kw
    )


def architecture(arch: str, width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> Architecture:
    if arch == "v1":
        return mobilenet_v1(width_mult, num_classes, **kwargs)
    if arch == "v2":
        return mobilenet_v2(width_mult, num_classes, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")


def _check_width(width_mult: float) -> None:
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")


def _check_channels(*channels: int) -> None:
    bad = [c for c in channels if not (isinstance(c, int) and c >= 1)]
    if bad:
        raise ValueError(f"channel counts must be positive integers, got {bad[0]!r}")


def _head(
    num_classes: int,
    dropout: float,
    *,
    hidden: Sequence[int] = (),
    hidden_activation: str = "relu",
    output: str = "none",
    classifier: Head | None = None,
) -> Head:
    """The head the builders' keywords describe: `classifier` as given, or `make_head`'s."""
    if classifier is not None:
        return check_head(classifier)
    if num_classes < 0:
        raise ValueError(f"num_classes must be at least 0 (0: no classifier, the pooled features), got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return make_head(num_classes, dropout, hidden, hidden_activation, output)


def _check(activation: str, bn_epsilon: float) -> None:
    if activation not in ("relu6", "relu"):
        raise ValueError(f"activation must be 'relu6' or 'relu', got {activation!r}")
    if not bn_epsilon > 0:
        raise ValueError(f"bn_epsilon must be positive, got {bn_epsilon}")


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int | tuple[int, int]) -> int:
    """Spatial size after a convolution padded by `padding` on both sides, or (before, after)."""
    before, after = (padding, padding) if isinstance(padding, int) else padding
    return (size + before + after - kernel_size) // stride + 1


def output_size(size: int, layer: ConvBN) -> int:
    """Spatial size after `layer`, for a square input of `size`."""
    return conv_output_size(size, layer.kernel_size, layer.stride, layer.pads(size, size)[0])


def total_stride(arch: Architecture) -> int:
    """How much the network downsamples: 32 for both. Inputs smaller than this reach the last
    stage as 1x1 maps made mostly of padding."""
    return math.prod(block.stride for block in arch.blocks)


# The smallest input either network takes: its total stride (32 for both). A smaller one reaches
# the last stage as 1x1 maps made mostly of padding.
MIN_RESOLUTION = max(total_stride(mobilenet_v1()), total_stride(mobilenet_v2()))


def parameter_count(arch: Architecture) -> int:
    """Learned parameters: convolution weights, BN scale and bias, the head's weights and biases."""
    total = 0
    for block in arch.blocks:
        for layer in block.layers:
            total += layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel_size**2
            total += 2 * layer.out_channels
    return total + sum((fan_in + 1) * units for fan_in, units in dense_shapes(arch))


def dense_shapes(arch: Architecture) -> list[tuple[int, int]]:
    """(inputs, outputs) of each dense layer of the head."""
    ins = [arch.num_features] + [layer.units for layer in arch.head.hidden]
    return [(fan_in, layer.units) for fan_in, layer in zip(ins, arch.head.layers)]


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
    for name, (fan_in, units) in zip(arch.head.flax_names, dense_shapes(arch)):
        rows.append(
            {
                "block": name,
                "role": "classifier" if name == "classifier" else "hidden",
                "type": "FC / s1",
                "filter": (fan_in, units),
                "input": (1, 1, fan_in),
                "params": fan_in * units + units,
                "mult_adds": fan_in * units,
            }
        )
    return rows
