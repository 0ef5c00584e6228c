"""MobileNetV1 and MobileNetV2 in plain PyTorch, built from `mobilenet_arch`.

MobileNetV2's modules nest exactly as torchvision's do, so `state_dict()` keys and shapes equal
`torchvision.models.mobilenet_v2(width_mult=...)`'s and weights load strictly both ways.
MobileNetV1 follows the same layout:

    features.0.{0,1}                   stem: Conv2d 3x3 s2, BatchNorm2d (ReLU6 at .2 has no weights)
    features.{1..13}.conv.0.{0,1}      depthwise 3x3 Conv2d, BatchNorm2d
    features.{1..13}.conv.1.{0,1}      pointwise 1x1 Conv2d, BatchNorm2d
    classifier.1                       Linear (classifier.0 is Dropout); a head with hidden
                                       layers numbers on (Dropout, Linear, ReLU, Linear: .1, .3)

Imports neither torchvision nor jax.
"""

from __future__ import annotations

import torch
from torch import nn

import mobilenet_arch

ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU}


class PaddedConv2d(nn.Conv2d):
    """A Conv2d that pads its input as the layer says (TensorFlow's SAME, which depends on the input
    size, or a fixed one-sided padding) and then convolves without padding of its own, as Hugging
    Face's `apply_tf_padding` does. Its state-dict keys are a Conv2d's."""

    def __init__(self, layer: mobilenet_arch.ConvBN):
        super().__init__(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, 0, groups=layer.groups, bias=False
        )
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = self.layer.pads(x.shape[-2], x.shape[-1])
        return super().forward(nn.functional.pad(x, (left, right, top, bottom)))


def _conv(layer: mobilenet_arch.ConvBN) -> nn.Conv2d:
    if layer.pad != "symmetric":
        return PaddedConv2d(layer)
    return nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        groups=layer.groups,
        bias=False,
    )


class ConvBNActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: Conv2d, BatchNorm2d, activation."""

    def __init__(self, layer: mobilenet_arch.ConvBN, activation: str, eps: float = mobilenet_arch.BN_EPSILON):
        super().__init__(_conv(layer), nn.BatchNorm2d(layer.out_channels, eps), ACTIVATIONS[activation](inplace=True))


def _layers(block: mobilenet_arch.Block, activation: str, eps: float) -> list[nn.Module]:
    # A layer without activation (V2's linear projection) is a bare Conv2d and BatchNorm2d, as in
    # torchvision; mobilenet_arch names the state-dict keys by the same rule.
    modules: list[nn.Module] = []
    for layer in block.layers:
        if layer.activation:
            modules.append(ConvBNActivation(layer, activation, eps))
        else:
            modules += [_conv(layer), nn.BatchNorm2d(layer.out_channels, eps)]
    return modules


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, and the residual
    connection when the stride is 1 and the channels are equal (Sandler et al., Section 3.3)."""

    def __init__(self, block: mobilenet_arch.Block, activation: str, eps: float):
        super().__init__()
        self.conv = nn.Sequential(*_layers(block, activation, eps))
        self.use_res_connect = block.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class DepthwiseSeparable(nn.Module):
    """MobileNetV1's block: 3x3 depthwise then 1x1 pointwise, each with BN and activation."""

    def __init__(self, block: mobilenet_arch.Block, activation: str, eps: float):
        super().__init__()
        self.conv = nn.Sequential(*_layers(block, activation, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


BLOCKS = {"inverted_residual": InvertedResidual, "depthwise_separable": DepthwiseSeparable}


def _block(block: mobilenet_arch.Block, activation: str, eps: float) -> nn.Module:
    if block.kind == "conv_bn":
        return ConvBNActivation(block.layers[0], activation, eps)
    return BLOCKS[block.kind](block, activation, eps)


class MobileNet(nn.Module):
    """The network that `architecture` describes, NCHW, initialised as torchvision initialises."""

    def __init__(self, architecture: mobilenet_arch.Architecture):
        super().__init__()
        self.architecture = architecture
        self.features = nn.Sequential(
            *[_block(b, architecture.activation, architecture.bn_epsilon) for b in architecture.blocks]
        )
        self.head_layers = _build_head(self, architecture)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        if self.head_layers is None:  # torchvision's own numbering: the Sequential runs itself
            return self.classifier(x)
        for layer, linear in zip(self.architecture.head.layers, self.head_layers):
            x = nn.functional.dropout(x, layer.dropout, self.training)
            x = linear(x)
            if layer.activation:
                x = DENSE_ACTIVATIONS[layer.activation]()(x)
        return x


DENSE_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _build_head(model: nn.Module, architecture: mobilenet_arch.Architecture) -> list[nn.Linear] | None:
    """The head's modules under the names its description gives (`Head.torch_names`).

    torchvision's numbering is one `classifier` Sequential of Dropout, Linear and activation
    modules, as torchvision and the transfer-learning recipe build it; None is returned and the
    Sequential runs. Any other names (a source's `fc`, `head.1`) get their Linear layers at those
    paths, in plain containers, and the returned list runs them in order. No layers: a feature
    extractor, whose classifier holds no tensors and passes the pooled features on.
    """
    head = architecture.head
    ins = [architecture.num_features] + [layer.units for layer in head.hidden]
    linears = [nn.Linear(fan_in, layer.units) for fan_in, layer in zip(ins, head.layers)]
    if not head.layers:
        model.classifier = nn.Sequential(nn.Dropout(p=0.0), nn.Identity())
        return None
    sequential = mobilenet_arch.sequential_modules(head)
    if head.torch_names == tuple(name for name, layer in sequential if layer is not None):
        modules = []  # in `sequential_modules`' order
        for i, (layer, linear) in enumerate(zip(head.layers, linears)):
            if i == 0 or layer.dropout:
                modules.append(nn.Dropout(p=layer.dropout))
            modules.append(linear)
            if layer.activation:
                modules.append(DENSE_ACTIVATIONS[layer.activation]())
        model.classifier = nn.Sequential(*modules)
        return None
    for name, linear in zip(head.torch_names, linears):
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, linear)
    return linears


class MobileNetV1(MobileNet):
    """`kwargs` are `mobilenet_arch.mobilenet_v1`'s (head, padding, bn_epsilon, ...)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.0,
        activation: str = "relu6",
        **kwargs,
    ):
        super().__init__(mobilenet_arch.mobilenet_v1(width_mult, num_classes, dropout, activation, **kwargs))


class MobileNetV2(MobileNet):
    """`kwargs` are `mobilenet_arch.mobilenet_v2`'s (depth_mult, fix_stem_head, padding, bn_epsilon)."""

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = mobilenet_arch.V2_DROPOUT, **kwargs
    ):
        super().__init__(mobilenet_arch.mobilenet_v2(width_mult, num_classes, dropout, **kwargs))


def create_model(arch: str, width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> MobileNet:
    """The PyTorch model for `arch` ("v1" or "v2")."""
    return MobileNet(mobilenet_arch.architecture(arch, width_mult, num_classes, **kwargs))
