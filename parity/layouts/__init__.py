"""Checkpoint layouts: how each library names and shapes a MobileNet's weights.

One small module per layout (`torchvision`, `timm`, `hf`, `keras`, and `flax`, this project's own
tree), each with the same four functions:

    recognise(keys) -> bool                     are these this layout's keys?
    architecture(weights, config=None)          the `mobilenet_arch.Architecture` the shapes say
    rules(architecture) -> list[Rule]           (their key, Flax path, transform) per tensor
    preprocessing(config=None) -> Preprocessing what the published weights expect

Rules are derived from the description, as `layouts.torchvision.rules` derives torchvision's: every
conv+BN layer gives the same five, the classifier two, with no per-layer special case. Shapes are
read from the weights (any width, any depth), never matched against a list of widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

import mobilenet_arch

# ImageNet statistics in 0..1 terms (torchvision's and timm's MobileNetV2 weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's Inception preprocessing, x / 127.5 - 1, in the same terms (Google's weights).
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


class ConversionError(ValueError):
    """Weights that do not fit the model: the message says what differs."""


class WeightsFileError(ValueError):
    """A weights file that cannot be read or written: the message says which file and why."""


class LayoutError(ConversionError):
    """Weights whose layout is not one this package reads, or that a layout cannot hold."""


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect of an RGB image scaled to 0..1: resize the shorter side to
    `resize_size` with `interpolation`, centre-crop `crop_size`, then `(x - mean) / std`."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        return cls(tuple(d["mean"]), tuple(d["std"]), int(d["resize_size"]), int(d["crop_size"]), str(d["interpolation"]))


@dataclass(frozen=True)
class Rule:
    key: str  # the layout's name of the tensor
    flax_path: tuple[str, ...]  # ("params" | "batch_stats", module..., leaf)
    transform: str  # conv (OIHW <-> HWIO), dense (out,in <-> in,out), same, keras_depthwise, keras_conv_dense

    def to_flax(self, value: np.ndarray) -> np.ndarray:
        if self.transform == "conv":
            return value.transpose(2, 3, 1, 0)
        if self.transform == "dense":
            return value.T
        if self.transform == "keras_depthwise":  # (k, k, C, 1) -> (k, k, 1, C)
            return value.transpose(0, 1, 3, 2)
        if self.transform == "keras_conv_dense":  # a 1x1 convolution on the pooled map: (1, 1, C, N) -> (C, N)
            return value.reshape(value.shape[-2:])
        return value

    def from_flax(self, value: np.ndarray) -> np.ndarray:
        if self.transform == "conv":
            return value.transpose(3, 2, 0, 1)
        if self.transform == "dense":
            return value.T
        if self.transform == "keras_depthwise":
            return value.transpose(0, 1, 3, 2)
        if self.transform == "keras_conv_dense":
            return value.reshape(1, 1, *value.shape)
        return value


TORCH_BN = ("weight", "bias", "running_mean", "running_var")
FLAX_BN = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))


def layer_rules(arch: mobilenet_arch.Architecture, names, bn_leaves=TORCH_BN, conv="conv", depthwise="conv", sep=".") -> list[Rule]:
    """Five rules per conv+BN layer; `names(block_index, block, layer) -> (conv key, BN prefix)`."""
    out = []
    for index, block in enumerate(arch.blocks):
        for layer in block.layers:
            conv_key, bn = names(index, block, layer)
            module = (block.name, layer.role)
            out.append(Rule(conv_key, ("params", *module, "conv", "kernel"), depthwise if layer.depthwise else conv))
            for leaf, (collection, name) in zip(bn_leaves, FLAX_BN):
                out.append(Rule(f"{bn}{sep}{leaf}", (collection, *module, "bn", name), "same"))
    return out


def shape(weights: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(np.shape(weights[key]))


def to_flax(weights: Mapping[str, Any], rules: list[Rule]) -> dict:
    """`{"params", "batch_stats"}` from `weights` (numpy arrays) through `rules`."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for rule in rules:
        node = variables
        for name in rule.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[rule.flax_path[-1]] = np.ascontiguousarray(rule.to_flax(np.asarray(weights[rule.key])))
    return variables


def from_flax(variables: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
    """The layout's flat `{key: array}` from Flax variables through `rules`."""
    out = {}
    for rule in rules:
        node: Any = variables
        for depth, name in enumerate(rule.flax_path):
            if not isinstance(node, Mapping) or name not in node:
                raise LayoutError(f"Flax variables have no {'/'.join(rule.flax_path[: depth + 1])}")
            node = node[name]
        out[rule.key] = np.array(rule.from_flax(np.asarray(node)), order="C")  # a writable copy (torch.from_numpy)
    return out


def check_weights(weights: Mapping[str, Any], rules: list[Rule], expected: Mapping[str, tuple], layout: str, ignore=()) -> None:
    """Every rule's key present with its expected shape and no key left over (bar `ignore` suffixes)."""
    wanted = {r.key for r in rules}
    missing = [k for k in (r.key for r in rules) if k not in weights]
    extra = [k for k in weights if k not in wanted and not k.endswith(tuple(ignore))]
    if missing or extra:
        parts = [f"{len(missing)} missing keys: {short_list(missing)}"] if missing else []
        parts += [f"{len(extra)} unexpected keys: {short_list(extra)}"] if extra else []
        raise LayoutError(f"{layout} weights that fit no MobileNet: " + "; ".join(parts))
    for key, want in expected.items():
        if shape(weights, key) != tuple(want):
            raise LayoutError(f"{layout} weights: {key} has shape {shape(weights, key)}, {tuple(want)} expected from the other layers")


def short_list(keys, limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def v2_positions(depths: list[int]) -> list[tuple[int, int]]:
    """(stage, repeat) of each inverted residual, in order, for per-stage repeat counts."""
    return [(stage, repeat) for stage, n in enumerate(depths) for repeat in range(n)]


def v2_stride(stage: int, repeat: int) -> int:
    """Only a stage's first repeat has the table's stride (Sandler et al., Table 2)."""
    return mobilenet_arch.V2_BLOCKS[stage][3] if repeat == 0 else 1


V1_DEPTHS = (1, 2, 2, 6, 2)  # the V1 blocks grouped as timm's stages (same output channels)
V2_DEPTHS = tuple(n for _, _, n, _ in mobilenet_arch.V2_BLOCKS)


def width_label(stem: int, last: int, last_base: int) -> float:
    """A width multiplier to name weights by when no config says it: the last block's channels over
    the paper's (rounding to multiples of 8 moves the stem's more)."""
    return round(last / last_base, 4) if last else round(stem / 32, 4)
