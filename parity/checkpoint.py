"""Any MobileNet checkpoint in, any layout out.

    ckpt = parity.load("mobilenetv2_100.pth")          # or a HF directory, .keras, .msgpack, a live model
    ckpt.model.apply(ckpt.variables, images)            # images as ckpt.preprocessing says
    parity.save(ckpt, "out_dir", layout="hf")           # torchvision, timm, hf, keras or flax (.msgpack)
    torch_model = parity.load_torch("model.msgpack")    # a torch_ref module

The layout, architecture, width, depth, classes and padding are read from the weights (and the
config the source has: a HF config.json, a .keras config, timm's pretrained_cfg); an override
that disagrees with them is an error naming both. Everything layout-specific is the layout's
record (`parity.layouts.registry.LAYOUTS`): nothing here names a layout.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import flax_mobilenet
import mobilenet_arch
from parity.layouts import ConversionError, LayoutError, Preprocessing, Source, flat_variables, flax_shapes, short_list, to_flax
from parity.layouts import flax as flax_layout
from parity.layouts import torchvision
from parity.layouts.registry import check_can_hold, layout, layout_for_path, locate, read_model, read_path  # noqa: F401


@dataclasses.dataclass(frozen=True, repr=False)
class Checkpoint:
    model: Any  # a flax_mobilenet.MobileNet
    variables: dict  # {"params", "batch_stats"} of jax arrays on the default device
    architecture: mobilenet_arch.Architecture
    preprocessing: Preprocessing
    layout: str  # where the weights came from: torchvision, timm, hf, keras or flax
    labels: tuple[str, ...] | None = None  # the class names, one per output, where known

    def __repr__(self) -> str:
        # One line; the variables' own repr runs to hundreds of kilobytes.
        labels = f", {len(self.labels)} labels" if self.labels else ""
        return f"Checkpoint({describe(self.architecture)}{labels}, from {self.layout}; images: {self.preprocessing.describe()})"

    def logits(self, images) -> np.ndarray:
        """The model's logits (the pooled features without a head) for NHWC images prepared as
        `preprocessing` says."""
        return np.asarray(self.model.apply(self.variables, images, train=False))

    def outputs(self, images) -> np.ndarray:
        """What the source returns for these images: the logits, or the probabilities where its
        output activation is softmax (Keras's applications). `model.apply` always returns logits."""
        return output_activation(self.architecture, self.logits(images))


def output_activation(arch: mobilenet_arch.Architecture, logits: np.ndarray) -> np.ndarray:
    """`logits` through the head's output activation: softmax over the last axis, or unchanged."""
    if arch.head.output != "softmax" or not arch.num_classes:
        return logits
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- reading


def load(source: Any, ema: bool = False, **overrides) -> Checkpoint:
    """A Checkpoint from a file, a HF model directory, a state dict, Flax variables, or a live
    torchvision/torch_ref, timm, transformers or keras model.

    A training checkpoint's dict (Lightning's, timm's, torchvision's references') is unwrapped to
    its weights, or with `ema` to their EMA copy; a network under a common key prefix (`model.`,
    `backbone.`, `module.`) is found there. Each is named in a note (a warning).

    `overrides`: `arch`, `width_mult`, `num_classes` are checked against the weights; `dropout`,
    `padding`, `bn_epsilon` replace what the source says (a bare state dict cannot say them), and
    `head_activation` the activation between a PyTorch state dict's head layers (ReLU assumed);
    `layout` names the layout instead of recognising it; `preprocessing` replaces the source's.
    """
    import jax

    overrides = dict(overrides)
    if "width" in overrides:
        overrides["width_mult"] = overrides.pop("width")
    read = _read(source, ema)
    asked = overrides.get("layout")
    if asked and read.layout not in (None, flax_layout.NAME) and asked != read.layout:
        raise ConversionError(f"these are {read.layout} weights, layout={asked!r} was asked for")
    if read.layout:
        name, weights = read.layout, read.weights
    elif asked:
        try:
            name, weights = locate(read.weights)
        except LayoutError:  # keys no layout recognises: as the caller says they are
            name, weights = asked, read.weights
        if name != asked:
            raise ConversionError(f"these are {name} weights, layout={asked!r} was asked for")
    else:
        name, weights = locate(read.weights)
    record = layout(name)
    if "head_activation" in overrides and "head_activation" not in record.overrides:
        raise ConversionError(f"head_activation is for a PyTorch state dict, which holds no activations: {name} weights say their head's themselves")
    kw = {k: overrides[k] for k in record.overrides if k in overrides}
    arch = _check_overrides(record.architecture(weights, read.config, **kw), overrides)
    pre = overrides["preprocessing"] if isinstance(overrides.get("preprocessing"), Preprocessing) else record.preprocessing(read.preprocessing, arch)
    # On the device once: numpy leaves would be copied there at every call of a jitted apply
    # (2-3 ms a call for V2's 14 MB on this CPU, a quarter of batch 1's latency).
    variables = jax.device_put(convert(weights, name, arch))
    return Checkpoint(flax_mobilenet.MobileNet(arch), variables, arch, pre, name)


def _read(source: Any, ema: bool) -> Source:
    if ema and not (isinstance(source, Mapping) and not _is_variables(source)) and not (
        isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in torchvision.TORCH_SUFFIXES
    ):
        raise ConversionError(f"{_name(source)} holds no EMA copy of the weights: ema=True (--ema) reads a PyTorch training checkpoint's (.pth)")
    if isinstance(source, str) and not Path(source).exists():
        from parity import hub

        path, pre = hub.resolve(source)
        read = read_path(path, ema)
        return dataclasses.replace(read, preprocessing=pre) if pre is not None else read
    if isinstance(source, (str, os.PathLike)):
        return read_path(Path(source), ema)
    if isinstance(source, Checkpoint):
        return Source(flat_variables(source.variables), source.architecture, source.preprocessing, flax_layout.NAME)
    if isinstance(source, Mapping):
        if _is_variables(source):
            return Source(flat_variables(source), None, None, flax_layout.NAME)
        from parity import io

        return Source(io.to_numpy(io.unwrap(source, "the dict given", ema)))
    return read_model(source)


def _is_variables(source: Mapping) -> bool:
    return "params" in source and "batch_stats" in source


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"a {type(source).__name__}"


def _check_overrides(arch: mobilenet_arch.Architecture, overrides: Mapping[str, Any]) -> mobilenet_arch.Architecture:
    if "arch" in overrides and overrides["arch"] != arch.arch:
        raise ConversionError(
            f"these weights are MobileNet{arch.arch.upper()} width {arch.width_mult:g}, not MobileNet{overrides['arch'].upper()}: "
            f"use arch={arch.arch!r} (--arch {arch.arch})"
        )
    if "num_classes" in overrides and overrides["num_classes"] != arch.num_classes:
        raise ConversionError(f"these weights have {arch.num_classes} classes, num_classes={overrides['num_classes']} was asked for")
    width = overrides.get("width_mult")
    if width is not None and abs(width - arch.width_mult) > 1e-6:
        try:
            same = _channels(mobilenet_arch.architecture(arch.arch, width, arch.num_classes)) == _channels(arch)
        except ValueError:
            same = False
        if not same:
            raise ConversionError(
                f"these weights have width {arch.width_mult:g} (stem {arch.blocks[0].out_channels}, "
                f"{arch.num_features} features), width_mult={width:g} was asked for: use width_mult={arch.width_mult:g} (--width {arch.width_mult:g})"
            )
        arch = dataclasses.replace(arch, width_mult=width)
    return arch


def _channels(arch: mobilenet_arch.Architecture) -> list[int]:
    return [layer.out_channels for block in arch.blocks for layer in block.layers]


# PyTorch's BN step counters: Flax keeps none (they matter only with momentum=None).
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def convert(weights: Mapping[str, Any], name: str, arch: mobilenet_arch.Architecture, describe_as: str | None = None) -> dict:
    """Flax variables (numpy) of `arch` from `name`-keyed `weights`: every key used, every shape
    the model's, or a ConversionError naming the missing and unexpected keys or the first wrong shape."""
    rules = layout(name).rules(arch)
    used = {r.key for r in rules}
    missing = [r.key for r in rules if r.key not in weights]
    extra = [k for k in weights if k not in used and not k.endswith(OPTIONAL_SUFFIXES)]
    what = describe_as or f"{name} weights of MobileNet{arch.arch.upper()}"
    if missing or extra:
        parts = [f"{len(missing)} missing keys: {short_list(missing)}"] if missing else []
        parts += [f"{len(extra)} unexpected keys: {short_list(extra)}"] if extra else []
        if extra and all(k.startswith("module.") for k in extra):
            parts.append("the keys start with 'module.': strip that DistributedDataParallel prefix first")
        raise LayoutError(f"{what}: " + "; ".join(parts))
    shapes = flax_shapes(arch)
    zero = np.float32(0)
    for rule in rules:
        want = tuple(rule.from_flax(np.broadcast_to(zero, shapes[rule.flax_path])).shape)
        got = tuple(np.shape(weights[rule.key]))
        if got != want:
            raise LayoutError(f"{rule.key}: shape {got} in the weights, {want} expected by {what}{_width_hint(weights, name, arch)}")
    return to_flax({k: np.asarray(v) for k, v in weights.items() if k in used}, rules)


def _width_hint(weights: Mapping[str, Any], name: str, arch: mobilenet_arch.Architecture) -> str:
    """Where the weights are another width of the same network: which, to pass instead."""
    try:
        theirs = layout(name).architecture(weights)
    except (ConversionError, KeyError, ValueError, IndexError):
        return ""
    if theirs.arch != arch.arch or abs(theirs.width_mult - arch.width_mult) < 1e-6:
        return ""
    return f"; these weights have width {theirs.width_mult:g}: use width_mult={theirs.width_mult:g} (--width {theirs.width_mult:g})"


def load_torch(source: Any, **overrides):
    """`source` as a torch_ref module in eval mode (it pads and normalises as the source does)."""
    ckpt = source if isinstance(source, Checkpoint) and not overrides else load(source, **overrides)
    return torchvision.torch_ref_model(ckpt)


# ---------------------------------------------------------------- writing


def save(
    checkpoint: Checkpoint, path: str | os.PathLike, layout: str | None = None, num_batches_tracked: int = 0, extra: Mapping[str, Any] | None = None
) -> None:
    """Write `checkpoint` in `layout` (default: from the name: .msgpack flax, .pth/.safetensors
    torchvision, .keras/.weights.h5 keras, a directory hf). A layout that cannot hold the
    architecture (TensorFlow padding as torchvision, symmetric padding as Keras) is a LayoutError
    naming what would be lost and the layouts that can hold it; nothing is written then.
    `extra`: further keys for the layout's description where it has one (a .msgpack's: a training
    run's class names); the other layouts have no place for them."""
    path = Path(path)
    name = layout or layout_for_path(path)
    record = _layout(name)
    if record.write is None:
        raise LayoutError(f"the {name} layout is read, not written")
    check_can_hold(name, checkpoint.architecture)
    record.write(checkpoint, path, num_batches_tracked=num_batches_tracked, extra=extra)


_layout = layout  # `save`'s argument takes the name


def describe(arch: mobilenet_arch.Architecture) -> str:
    return mobilenet_arch.describe(arch)
