"""Any MobileNet checkpoint in, any layout out.

    ckpt = parity.load("mobilenetv2_100.pth")          # or a HF directory, .keras, .msgpack, a live model
    ckpt.logits(ckpt.preprocess(["cat.jpg"]))           # images prepared as ckpt.preprocessing says
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
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import flax_mobilenet
import mobilenet_arch
from parity.layouts import ConversionError, LayoutError, Preprocessing, Source, WeightsFileError, flat_variables, flax_shapes, short_list, to_flax
from parity.layouts import flax as flax_layout
from parity.layouts import torchvision
from parity.layouts.registry import check_can_hold, layout, layout_for_path, locate, read_model, read_path  # noqa: F401
from parity.preprocess import preprocess


@dataclasses.dataclass(frozen=True, repr=False)
class Checkpoint:
    model: Any  # a flax_mobilenet.MobileNet
    variables: dict  # {"params", "batch_stats"} of jax arrays on the default device
    architecture: mobilenet_arch.Architecture
    preprocessing: Preprocessing
    layout: str  # where the weights came from: torchvision, timm, hf, keras or flax
    labels: tuple[str, ...] | None = None  # the class names, one per output, where known
    # How `load` came by it, one line each: what was read, inferred (not said by the source) and
    # replaced (by the caller); `convert` and `export` print them.
    origin: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # One line; the variables' own repr runs to hundreds of kilobytes.
        labels = f", {len(self.labels)} labels" if self.labels else ""
        return f"Checkpoint({describe(self.architecture)}{labels}, from {self.layout}; images: {self.preprocessing.describe()})"

    def preprocess(self, images) -> np.ndarray:
        """float32 NHWC: `images` (paths, PIL images or uint8 arrays, one or a list) resized,
        cropped and normalised as `preprocessing` says (`parity.preprocess`)."""
        return preprocess(images, self.preprocessing)

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


# Google's TensorFlow-slim classifiers (transformers' google/ checkpoints, TF-Hub's) put a
# "background" class before ImageNet's 1000; keras.applications' weights have 1000 outputs.
BACKGROUND_CLASSES = 1001


def load(source: Any, ema: bool = False, labels=None, drop_background: bool = False, **overrides) -> Checkpoint:
    """A Checkpoint from a file, a HF model directory, a state dict, Flax variables, or a live
    torchvision/torch_ref, timm, transformers or keras model.

    A training checkpoint's dict (Lightning's, timm's, torchvision's references') is unwrapped to
    its weights, or with `ema` to their EMA copy; a network under a common key prefix (`model.`,
    `backbone.`, `module.`) is found there. Each is named in a note (a warning).

    `overrides`: `arch`, `width_mult`, `num_classes` are checked against the weights; `dropout`,
    `padding`, `bn_epsilon` replace what the source says (a bare state dict cannot say them), and
    `head_activation` the activation between a PyTorch state dict's head layers (ReLU assumed);
    `layout` names the layout instead of recognising it; `preprocessing` replaces the source's.

    `labels`: the class names, one per output (a sequence, or the path of a text file, one per
    line), in place of the source's own (a HF config's id2label, a .msgpack's description,
    torchvision's weights enum); a count that is not the outputs' is an error. `drop_background`:
    a 1001-output classifier (Google's: "background", then ImageNet's 1000) without its output 0,
    the other logits unchanged (given `labels` name the 1000 left); any other count is an error.
    `Checkpoint.origin` says what was read, inferred and replaced.
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
    variables = convert(weights, name, arch)
    names = read.labels
    if names is not None and len(names) != arch.num_classes:
        if arch.num_classes:  # a base model's config keeps the id2label of the classifier it lacks
            warnings.warn(f"the source's {len(names)} class names do not match its {arch.num_classes} outputs: left out", stacklevel=2)
        names = None
    origin = [f"read: {name} weights ({_name(source)}): {describe(arch)}; {_count(names)}; images: {pre.describe()}"]
    origin += _inferred(read, arch, overrides)
    replaced = [f"{what} {overrides[k]}" for k, what in (("dropout", "dropout"), ("padding", "padding"), ("bn_epsilon", "BatchNorm epsilon")) if k in overrides]
    replaced += ["preprocessing as given"] if isinstance(overrides.get("preprocessing"), Preprocessing) else []
    if drop_background:
        arch, variables, names = without_background(arch, variables, names)
        replaced.append(f"background class dropped ({BACKGROUND_CLASSES} -> {arch.num_classes} outputs)")
    if labels is not None:
        given = given_labels(labels, arch.num_classes)
        replaced.append(f"labels: {len(given)} given" + (f" in place of the source's {len(names)}" if names else ""))
        names = given
    if replaced:
        origin.append("replaced: " + ", ".join(replaced))
    # On the device once: numpy leaves would be copied there at every call of a jitted apply
    # (2-3 ms a call for V2's 14 MB on this CPU, a quarter of batch 1's latency).
    return Checkpoint(flax_mobilenet.MobileNet(arch), jax.device_put(variables), arch, pre, name, names, tuple(origin))


def _count(labels) -> str:
    return f"{len(labels)} labels" if labels else "no class names"


def _inferred(read: Source, arch: mobilenet_arch.Architecture, overrides: Mapping[str, Any]) -> list[str]:
    """What the source does not say and the layout assumed: a bare state dict's width label,
    padding and BatchNorm epsilon, and its preprocessing, where the caller gave none."""
    unsaid = {}
    if read.config is None:
        unsaid = {"width_mult": f"width {arch.width_mult:g} from the channels", "padding": mobilenet_arch.padding_in_words(arch), "bn_epsilon": f"BatchNorm epsilon {arch.bn_epsilon:g}"}
    if read.preprocessing is None:
        unsaid["preprocessing"] = "preprocessing"
    said = [what for key, what in unsaid.items() if key not in overrides]
    return [f"inferred: {', '.join(said)} (not in the source: the layout's defaults)"] if said else []


def given_labels(labels, num_classes: int) -> tuple[str, ...]:
    """`labels` (class names, or the path of a text file of them, one per line) checked against
    the model's `num_classes` outputs."""
    where = "labels"
    if isinstance(labels, (str, os.PathLike)):
        where = str(labels)
        try:
            labels = [line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise WeightsFileError(f"{where}: cannot read the class names ({e.__class__.__name__}): expected a text file, one name per line") from None
    labels = tuple(labels)
    if not all(isinstance(name, str) for name in labels):
        raise ConversionError(f"{where}: class names must be strings, got {', '.join(sorted({type(n).__name__ for n in labels}))}")
    if not num_classes:
        raise ConversionError(f"{where}: these weights have no classifier (pooled features): there are no outputs to name")
    if len(labels) != num_classes:
        raise ConversionError(f"{where}: {len(labels)} class names for {num_classes} outputs: give one name per output, in the outputs' order")
    return labels


def without_background(arch: mobilenet_arch.Architecture, variables: dict, labels: tuple[str, ...] | None):
    """(arch, variables, labels) without output 0 of a 1001-output classifier: the output layer's
    kernel column and bias entry removed, so the other logits are the same numbers."""
    if arch.num_classes != BACKGROUND_CLASSES:
        raise ConversionError(
            f"drop_background (--drop-background): these weights have {arch.num_classes} outputs, not {BACKGROUND_CLASSES} "
            "(Google's: a background class, then ImageNet's 1000): there is no background class to drop"
        )
    params = dict(variables["params"])
    layer = params[arch.flax_classifier]
    params[arch.flax_classifier] = {"kernel": np.ascontiguousarray(layer["kernel"][:, 1:]), "bias": np.ascontiguousarray(layer["bias"][1:])}
    return mobilenet_arch.with_classes(arch, BACKGROUND_CLASSES - 1), {**variables, "params": params}, labels[1:] if labels else labels


def _read(source: Any, ema: bool) -> Source:
    if ema and not (isinstance(source, Mapping) and not _is_variables(source)) and not (
        isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in torchvision.TORCH_SUFFIXES
    ):
        raise ConversionError(f"{_name(source)} holds no EMA copy of the weights: ema=True (--ema) reads a PyTorch training checkpoint's (.pth)")
    if isinstance(source, str) and not Path(source).exists():
        from parity import hub

        path, pre, labels = hub.resolve(source)
        read = read_path(path, ema)
        return dataclasses.replace(read, preprocessing=pre or read.preprocessing, labels=labels or read.labels)
    if isinstance(source, (str, os.PathLike)):
        return read_path(Path(source), ema)
    if isinstance(source, Checkpoint):
        return Source(flat_variables(source.variables), source.architecture, source.preprocessing, flax_layout.NAME, source.labels)
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
