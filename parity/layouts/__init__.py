"""Checkpoint layouts: how each library names and shapes a MobileNet's weights.

One module per layout (`torchvision`, `timm`, `hf`, `keras`, and `flax`, this project's own tree),
each ending in one `Layout` record (below); `parity.layouts.registry.LAYOUTS` lists them, and
`parity.load`, `parity.save`, `convert`, `report` and `export` read only the records. Adding a
layout is one module and one entry in that list.

Rules are derived from the description, as `layouts.torchvision.rules` derives torchvision's: every
conv+BN layer gives the same five, the classifier two, with no per-layer special case. Shapes are
read from the weights (any width, any depth), never matched against a list of widths.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
from flax import traverse_util

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


# How an image is brought to the model's size: "shorter" resizes the shorter side to
# `resize_size` and centre-crops `crop_size` (torchvision's and timm's evaluation); "whole" resizes
# the whole image to `crop_size` x `crop_size`, no crop (Keras's `image_dataset_from_directory`
# and `load_img(target_size=...)`, a fixed-input Keras model's publisher).
RESIZE_MODES: tuple[str, ...] = ("shorter", "whole")


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect of an RGB image scaled to 0..1: resized as `resize` says with
    `interpolation` to the model's `crop_size`, then `(x - mean) / std`."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    resize: str = "shorter"
    # The centre crop's corner, (size - crop) / 2: "round"ed as torchvision's CenterCrop (timm's
    # too), or "floor"ed as transformers' image processors; a pixel apart where the margin is odd.
    crop_offset: str = "round"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        return cls(
            tuple(d["mean"]), tuple(d["std"]), int(d["resize_size"]), int(d["crop_size"]), str(d["interpolation"]),
            str(d.get("resize", "shorter")),  # descriptions written before "whole" existed
            str(d.get("crop_offset", "round")),  # and before transformers' crop
        )

    def describe(self) -> str:
        size = f"shorter side {self.resize_size}, centre crop {self.crop_size}" if self.resize == "shorter" else f"whole image to {self.crop_size}x{self.crop_size}"
        if self.resize == "shorter" and self.crop_offset != "round":
            size += f" (offsets {self.crop_offset}ed)"
        return f"{size}, {self.interpolation}, mean {tuple(self.mean)}, std {tuple(self.std)}"


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


def classes(weights: Mapping[str, Any], key: str, axis: int = 0) -> int:
    """The classifier's outputs, its `key` kernel's `axis`; 0 where there is none (a feature
    extractor: timm's num_classes=0, transformers' base model, Keras's include_top=False)."""
    return shape(weights, key)[axis] if key in weights else 0


def head_rules(arch: mobilenet_arch.Architecture, names, transform: str, kernel: str = "weight", bias: str = "bias", sep: str = ".") -> list[Rule]:
    """Two rules per dense layer of the head, `names` its prefixes in the layout (none for a
    feature extractor)."""
    out = []
    for name, flax_name in zip(names, arch.head.flax_names):
        out.append(Rule(f"{name}{sep}{kernel}", ("params", flax_name, "kernel"), transform))
        out.append(Rule(f"{name}{sep}{bias}", ("params", flax_name, "bias"), "same"))
    return out


def torch_head(
    weights: Mapping[str, Any],
    num_features: int,
    backbone: Callable[[str], bool],
    single: str,
    activation: str | None = "relu",
    dropout: float = 0.0,
) -> mobilenet_arch.Head:
    """The head of a PyTorch state dict, read by shapes: the linear layers (a 2-D `X.weight` and a
    1-D `X.bias` outside the backbone) chained from the backbone's `num_features`, each one's inputs
    the previous one's outputs, whatever they are named (torchvision's `classifier.1`, the
    recipe's `classifier.1` and `.3`, `fc`, `head.0`). A state dict holds no activations: between
    layers `activation` is assumed (ReLU, the recipe's and the common choice); `dropout` goes before
    the first. A lone layer named `single` is the library's own classifier. No layers: no head.
    Any 2-D/1-D pair that does not chain is a LayoutError naming it."""
    linear = {
        k[: -len(".weight")]: tuple(np.shape(v))[::-1]  # PyTorch's (out, in) as (in, out)
        for k, v in weights.items()
        if k.endswith(".weight") and not backbone(k) and len(np.shape(v)) == 2 and k[: -len("weight")] + "bias" in weights
    }
    chain = chained(linear, num_features, key=_natural)
    if linear:
        name, (i, out) = next(iter(linear.items()))
        after = f"the layer before it ({chain[-1][0]}) has {chain[-1][1]} outputs" if chain else f"the backbone gives {num_features} features"
        raise LayoutError(f"{name}: a linear layer of {i} inputs that does not follow on from the others ({after}): not a MobileNet's head")
    if not chain:
        return mobilenet_arch.Head()
    layers = tuple(
        mobilenet_arch.Dense(units, dropout if i == 0 else 0.0, activation if i < len(chain) - 1 else None, torch_name=name)
        for i, (name, units) in enumerate(chain)
    )
    if len(layers) == 1 and layers[0].torch_name == single:
        layers = (dataclasses.replace(layers[0], torch_name=""),)  # the library's own name: its default
    return mobilenet_arch.check_head(mobilenet_arch.Head(layers))


def chained(shapes: dict[str, tuple[int, int]], num_features: int, key=None) -> list[tuple[str, int]]:
    """(name, outputs) of the dense layers in `shapes` ({name: (inputs, outputs)}) that chain from
    the backbone's `num_features`, each one's inputs the previous one's outputs, in order (ties by
    `key`). They are taken out of `shapes`: what is left does not chain."""
    chain, fan_in = [], num_features
    while nexts := sorted((name for name, (i, _) in shapes.items() if i == fan_in), key=key):
        chain.append((nexts[0], shapes.pop(nexts[0])[1]))
        fan_in = chain[-1][1]
    return chain


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def classifier_rules(arch: mobilenet_arch.Architecture, kernel: str, bias: str, transform: str) -> list[Rule]:
    """The output layer's two rules in a layout that holds a single-layer head, none for a
    feature extractor."""
    if not arch.num_classes:
        return []
    return [
        Rule(kernel, ("params", arch.flax_classifier, "kernel"), transform),
        Rule(bias, ("params", arch.flax_classifier, "bias"), "same"),
    ]


def to_flax(weights: Mapping[str, Any], rules: list[Rule]) -> dict:
    """`{"params", "batch_stats"}` from `weights` (numpy arrays) through `rules`."""
    flat = {rule.flax_path: np.ascontiguousarray(rule.to_flax(np.asarray(weights[rule.key]))) for rule in rules}
    return {"params": {}, "batch_stats": {}, **traverse_util.unflatten_dict(flat)}


def from_flax(variables: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
    """The layout's flat `{key: array}` from Flax variables through `rules`."""
    flat = traverse_util.flatten_dict(_plain(variables))
    out = {}
    for rule in rules:
        if rule.flax_path not in flat:
            have = {path[:depth] for path in flat for depth in range(1, len(path) + 1)}
            depth = next(d for d in range(1, len(rule.flax_path) + 1) if rule.flax_path[:d] not in have)
            raise LayoutError(f"Flax variables have no {'/'.join(rule.flax_path[:depth])}")
        out[rule.key] = np.array(rule.from_flax(np.asarray(flat[rule.flax_path])), order="C")  # a writable copy (torch.from_numpy)
    return out


def flat_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables as this project's layout keys them: `params/features_0/stem/conv/kernel`."""
    return {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(_plain(variables)).items()}


def _plain(tree: Mapping[str, Any]) -> dict:
    """Nested plain dicts (flax's FrozenDict and other mappings included), which traverse_util walks."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def short_list(keys, limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def v2_stride(stage: int, repeat: int) -> int:
    """Only a stage's first repeat has the table's stride (Sandler et al., Table 2)."""
    return mobilenet_arch.V2_BLOCKS[stage][3] if repeat == 0 else 1


def width_label(stem: int, last: int, last_base: int) -> float:
    """A width multiplier to name weights by when no config says it: the last block's channels over
    the paper's (rounding to multiples of 8 moves the stem's more)."""
    return round(last / last_base, 4) if last else round(stem / 32, 4)


def rebuilt(arch: mobilenet_arch.Architecture, padding=None, bn_epsilon=None, dropout=None) -> mobilenet_arch.Architecture:
    """`arch` with another padding (every layer), BatchNorm epsilon or dropout, where given."""
    if padding is not None:
        pad = padding if isinstance(padding, str) else mobilenet_arch.check_padding(padding)
        blocks = tuple(dataclasses.replace(b, layers=tuple(dataclasses.replace(l, pad=pad) for l in b.layers)) for b in arch.blocks)
        arch = dataclasses.replace(arch, blocks=blocks)
    if bn_epsilon is not None:
        arch = dataclasses.replace(arch, bn_epsilon=bn_epsilon)
    if dropout is not None:
        arch = mobilenet_arch.with_dropout(arch, dropout)
    return arch


def same_architecture(a: mobilenet_arch.Architecture, b: mobilenet_arch.Architecture) -> bool:
    """The same network, whatever width it is labelled with, whatever its (training-only) dropout
    and its output activation, and whatever the sources named its head's layers."""
    return _comparable(a) == _comparable(b)


def _comparable(arch: mobilenet_arch.Architecture) -> mobilenet_arch.Architecture:
    layers = tuple(mobilenet_arch.Dense(layer.units, 0.0, layer.activation) for layer in arch.head.layers)
    return dataclasses.replace(arch, width_mult=0.0, head=mobilenet_arch.Head(layers))


# ---------------------------------------------------------------- the layout record


@dataclass(frozen=True)
class Source:
    """What reading a file or a live model gives: the weights as the layout keys them (flat, numpy)
    and whatever the source says beside them. `layout` None: recognised from the keys."""

    weights: Mapping[str, Any]
    config: Any = None  # the layout's own: a HF config.json, a Keras model's, timm's drop_rate, our description
    preprocessing: Any = None  # the layout's own: preprocessor_config.json, timm's pretrained_cfg, ours
    layout: Optional[str] = None
    labels: Optional[tuple[str, ...]] = None  # the class names the source gives, one per output


@dataclass(frozen=True)
class Layout:
    """Everything `parity` knows of one layout. Functions take and return plain data: a layout
    module imports nothing of `parity` above `parity.layouts`."""

    name: str
    expects: str  # the keys `recognise` looks for, for the message that lists every layout's
    # Are these this layout's keys? May raise LayoutError where they are this library's but of
    # another network (timm's MobileNetV3), to name it.
    recognise: Callable[[Mapping[str, Any]], bool]
    # The Architecture the weights' shapes (and the source's config) say; overrides as keywords:
    # padding, bn_epsilon, dropout.
    architecture: Callable[..., mobilenet_arch.Architecture]
    rules: Callable[[mobilenet_arch.Architecture], list[Rule]]
    # What the source's images must be prepared as: (the source's own preprocessing config or
    # None, architecture) -> Preprocessing.
    preprocessing: Callable[[Any, mobilenet_arch.Architecture], Preprocessing]
    # Why this layout cannot hold `architecture` (what would be lost), or None.
    cannot_hold: Callable[[mobilenet_arch.Architecture], Optional[str]]
    # (checkpoint, path, num_batches_tracked, extra) -> None: writes the file or directory
    # atomically, with `extra` (a run's metadata) where the layout has a place for it; None for a
    # layout that is only read.
    write: Optional[Callable[..., None]] = None
    # Whether its files keep the class names (`Checkpoint.labels`) when written.
    holds_labels: bool = False
    # Whether `path` names a file (or directory) of this layout when writing.
    writes: Callable[[Path], bool] = lambda path: False
    # Suffixes of the files it reads ("/" for a directory) and how: path -> Source.
    reads: tuple[str, ...] = ()
    read: Optional[Callable[[Path], Source]] = None
    # A live model of this library -> Source, or None where `model` is not one.
    of_model: Callable[[Any], Optional[Source]] = lambda model: None
    # (source as given, checkpoint, NHWC images) -> (library name, logits) from the library itself
    # run on the source, or None where it is not installed or cannot run this source.
    run_library: Callable[..., Optional[tuple[str, np.ndarray]]] = lambda source, checkpoint, images: None
    # (a file or directory this layout wrote, its checkpoint, NHWC images) -> (library name,
    # logits) from the library the file is for, reading the file itself; None where not installed.
    run_written: Callable[..., Optional[tuple[str, np.ndarray]]] = lambda path, checkpoint, images: None
    # The overrides `architecture` takes: padding, bn_epsilon, dropout, and `head_activation` where
    # the head is read by shapes from a state dict, which holds no activations.
    overrides: tuple[str, ...] = ("dropout", "padding", "bn_epsilon")
    # Whether run_library and run_written give the model's outputs through the head's output
    # activation (Keras's softmax probabilities) rather than its logits.
    returns_output: bool = False


def nchw(images: np.ndarray):
    """NHWC numpy images as the NCHW torch tensor PyTorch's models take."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@functools.lru_cache(maxsize=32)
def flax_shapes(arch: mobilenet_arch.Architecture) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every Flax variable of `arch`, by path, from the model itself (no computation)."""
    import jax

    import flax_mobilenet

    tree = jax.eval_shape(lambda: flax_mobilenet.MobileNet(arch).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(_plain(tree)).items()}


def what_is_lost(layout: str, arch: mobilenet_arch.Architecture, rules: list[Rule], architecture) -> str | None:
    """What a layout whose keys say only shapes (torchvision's, timm's) cannot hold of `arch`: the
    weights' shapes written through `rules` and read back by `architecture`, the difference named."""
    shapes = flax_shapes(arch)
    zero = np.float32(0)
    weights = {r.key: np.broadcast_to(zero, r.from_flax(np.broadcast_to(zero, shapes[r.flax_path])).shape) for r in rules}
    reread = architecture(weights)
    if same_architecture(arch, reread):
        return None
    pads = sorted({str(l.pad) for b in arch.blocks for l in b.layers})
    if pads != ["symmetric"]:
        return f"{layout}'s models pad symmetrically, these weights pad {', '.join(pads)}"
    if arch.bn_epsilon != reread.bn_epsilon:
        return f"{layout}'s models use BatchNorm epsilon {reread.bn_epsilon:g}, these weights {arch.bn_epsilon:g}"
    return f"{layout}'s layout cannot express this architecture (its residual connections differ)"
