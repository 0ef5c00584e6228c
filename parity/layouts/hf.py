"""Hugging Face transformers' layout (`MobileNetV1ForImageClassification`, `...V2...`): Google's
TensorFlow checkpoints, a directory of config.json, model.safetensors, preprocessor_config.json.

    mobilenet_v1.conv_stem, .layer.{2i} / .layer.{2i+1}          stem; block i+1 depthwise / pointwise
    mobilenet_v2.conv_stem.first_conv                             stem
    mobilenet_v2.conv_stem.[expand_1x1,] conv_3x3, reduce_1x1     features_1
    mobilenet_v2.layer.{j}.expand_1x1, conv_3x3, reduce_1x1       features_{j+2}
    mobilenet_v2.conv_1x1                                         head
    classifier                                                    Linear (1001 labels: 0 is "background")

each conv `<prefix>.convolution.weight`, its BN `<prefix>.normalization.*`. The config decides
what the keys cannot: `tf_padding` (TensorFlow SAME, asymmetric at stride 2) and `layer_norm_eps`
(1e-3); `classifier_dropout_prob` is kept as given (Google's configs hold TF's *keep*
probability there; it does not matter at evaluation).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import mobilenet_arch
from parity.layouts import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    Layout,
    LayoutError,
    Preprocessing,
    Rule,
    Source,
    WeightsFileError,
    classes,
    classifier_rules,
    layer_rules,
    same_architecture,
    shape,
    v2_stride,
)

NAME = "hf"
EXPECTS = "mobilenet_v1.* or mobilenet_v2.* (a base model's keys are read under its config's model_type), classifier.weight"
# transformers' MobileNetV2Model numbers the 16 inverted residuals after the first through the
# paper's stages: `layer.j` is the table's (stage, repeat) block j + 1.
V2_POSITIONS = tuple(mobilenet_arch.stage_positions(mobilenet_arch.V2_STAGE_DEPTHS))[1:]
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's numbering


def recognise(keys) -> bool:
    # The stems' own keys, not the bare prefix: a user's module may name an attribute mobilenet_v2.
    return not {"mobilenet_v1.conv_stem.convolution.weight", "mobilenet_v2.conv_stem.first_conv.convolution.weight"}.isdisjoint(keys)


def _v2(keys) -> bool:
    return any(k.startswith("mobilenet_v2.") for k in keys)


def architecture(weights: Mapping[str, Any], config: Mapping[str, Any] | None = None, **kw) -> mobilenet_arch.Architecture:
    config = dict(config or {})
    if config.get("output_stride", 32) != 32:
        raise LayoutError(f"output_stride {config['output_stride']} (dilated, for segmentation): only 32, the classifier's, is described")
    kw.setdefault("padding", "same" if config.get("tf_padding", True) else "symmetric")
    kw.setdefault("bn_epsilon", float(config.get("layer_norm_eps", mobilenet_arch.TF_BN_EPSILON)))
    if "depth_multiplier" in config:
        kw.setdefault("width_mult", float(config["depth_multiplier"]))
    num_classes = classes(weights, "classifier.weight")
    if not _v2(weights):
        p = "mobilenet_v1."
        stem = shape(weights, p + "conv_stem.convolution.weight")[0]
        outs = [shape(weights, f"{p}layer.{2 * i + 1}.convolution.weight")[0] for i in range(13)]
        kw.setdefault("width_mult", round(outs[-1] / 1024, 4))
        kw.setdefault("dropout", float(config.get("classifier_dropout_prob", 0.0)))
        return mobilenet_arch.mobilenet_v1_from_channels(stem, outs, num_classes, **kw)
    p = "mobilenet_v2."
    stem = shape(weights, p + "conv_stem.first_conv.convolution.weight")[0]
    extra = p + "conv_stem.expand_1x1.convolution.weight"  # first_layer_is_expansion=False
    specs = [(shape(weights, extra)[0] if extra in weights else None, shape(weights, p + "conv_stem.reduce_1x1.convolution.weight")[0], 1, 0, 0)]
    for j, (stage, repeat) in enumerate(V2_POSITIONS):
        specs.append(
            (shape(weights, f"{p}layer.{j}.expand_1x1.convolution.weight")[0], shape(weights, f"{p}layer.{j}.reduce_1x1.convolution.weight")[0], v2_stride(stage, repeat), stage, repeat)
        )
    head = shape(weights, p + "conv_1x1.convolution.weight")[0]
    kw.setdefault("width_mult", round(specs[-1][1] / 320, 4))
    kw.setdefault("dropout", float(config.get("classifier_dropout_prob", 0.0)))
    # transformers' stem block never adds its input (torchvision's does when its channels are equal)
    return mobilenet_arch.mobilenet_v2_from_blocks(stem, specs, head, num_classes, stem_residual=False, **kw)


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    v = "mobilenet_v1." if arch.arch == "v1" else "mobilenet_v2."

    def names(index: int, block, layer) -> tuple[str, str]:
        if arch.arch == "v1":
            c = v + "conv_stem." if layer.role == "stem" else f"{v}layer.{2 * (index - 1) + (layer.role == 'pointwise')}."
        elif layer.role == "stem":
            c = v + "conv_stem.first_conv."
        elif layer.role == "head":
            c = v + "conv_1x1."
        else:
            base = v + "conv_stem." if index == 1 else f"{v}layer.{index - 2}."
            c = base + {"expand": "expand_1x1.", "depthwise": "conv_3x3.", "project": "reduce_1x1."}[layer.role]
        return c + "convolution.weight", c + "normalization"

    return layer_rules(arch, names) + classifier_rules(arch, "classifier.weight", "classifier.bias", "dense")


def preprocessing(config: Mapping[str, Any] | None = None, arch=None) -> Preprocessing:
    """From a `preprocessor_config.json` (MobileNetV{1,2}ImageProcessor's fields) where given;
    else Google's: shorter side 256, bilinear, crop 224, x / 127.5 - 1. The centre crop's offsets
    are rounded down, as transformers' `center_crop` computes them."""
    if not config:
        return Preprocessing(INCEPTION_MEAN, INCEPTION_STD, 256, 224, "bilinear", crop_offset="floor")
    size, crop = config.get("size", {"shortest_edge": 256}), config.get("crop_size", {"height": 224, "width": 224})
    return Preprocessing(
        tuple(config.get("image_mean", INCEPTION_MEAN)),
        tuple(config.get("image_std", INCEPTION_STD)),
        int(size.get("shortest_edge", size.get("height", 256))),
        int(crop.get("height", 224)),
        RESAMPLE.get(config.get("resample", 2), "bilinear"),
        crop_offset="floor",
    )


# ---------------------------------------------------------------- writing


def config_architecture(config: Mapping[str, Any], arch: str, num_classes: int) -> mobilenet_arch.Architecture:
    """The architecture transformers builds from `config` (its channel rules, not shapes)."""
    dm, min_depth = float(config["depth_multiplier"]), config.get("min_depth", 8)
    kw = dict(
        padding="same" if config.get("tf_padding", True) else "symmetric",
        bn_epsilon=float(config.get("layer_norm_eps", mobilenet_arch.TF_BN_EPSILON)),
        dropout=float(config.get("classifier_dropout_prob", 0.0)),
        width_mult=dm,
    )
    if arch == "v1":
        c = mobilenet_arch.hf_v1_channels(dm, min_depth)
        return mobilenet_arch.mobilenet_v1_from_channels(c.stem, c.outs, num_classes, **kw)
    c = mobilenet_arch.hf_v2_channels(
        dm, config.get("depth_divisible_by", 8), min_depth, config.get("expand_ratio", 6.0),
        config.get("finegrained_output", True), config.get("first_layer_is_expansion", True),
    )
    return mobilenet_arch.mobilenet_v2_from_blocks(c.stem, c.blocks, c.head, num_classes, stem_residual=False, **kw)


def config_for(arch: mobilenet_arch.Architecture) -> dict:
    """The transformers config whose channel rules give exactly `arch`'s channels, or LayoutError.

    The depth multiplier is searched among values the channels themselves suggest (the width label,
    stem / 32, last block / its paper channels), each with `finegrained_output` on and off."""
    if reason := expresses(arch):
        raise LayoutError(reason)
    last = arch.blocks[-1 if arch.arch == "v1" else -2].out_channels
    base = 1024 if arch.arch == "v1" else 320
    candidates = [arch.width_mult, arch.blocks[0].out_channels / 32, last / base, round(last / base, 4), round(arch.blocks[0].out_channels / 32, 4)]
    first_is_expansion = arch.arch == "v1" or arch.blocks[1].layers[0].role != "expand"
    for dm in candidates:
        for fine in (True, False) if arch.arch == "v2" else (True,):
            if not dm > 0:
                continue
            config = _config(arch, dm, fine, first_is_expansion)
            if same_architecture(config_architecture(config, arch.arch, arch.num_classes), arch):
                return config
    raise LayoutError("no transformers depth_multiplier reproduces these channels (they follow another library's rounding)")


def _config(arch, dm, finegrained, first_is_expansion) -> dict:
    name = "MobileNetV1" if arch.arch == "v1" else "MobileNetV2"
    pad = {layer.pad for block in arch.blocks for layer in block.layers}
    config = {
        "architectures": [f"{name}ForImageClassification"],
        "model_type": f"mobilenet_{arch.arch}",
        "num_channels": 3,
        "image_size": 224,
        "depth_multiplier": float(dm),
        "min_depth": 8,
        "hidden_act": arch.activation,
        "tf_padding": pad == {"same"},
        "classifier_dropout_prob": float(arch.dropout),
        "initializer_range": 0.02,
        "layer_norm_eps": float(arch.bn_epsilon),
        "id2label": {str(i): f"LABEL_{i}" for i in range(arch.num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(arch.num_classes)},
    }
    if arch.arch == "v2":
        config.update(
            depth_divisible_by=8, expand_ratio=6.0, output_stride=32, first_layer_is_expansion=first_is_expansion,
            finegrained_output=finegrained, semantic_loss_ignore_index=255,
        )
    return config


def expresses(arch: mobilenet_arch.Architecture) -> str | None:
    """Why transformers' models cannot hold `arch`, or None."""
    head = arch.head
    # A softmax output is not lost: transformers returns the logits, as torchvision and timm do.
    if len(head.layers) > 1 or any(layer.activation for layer in head.layers):
        lost = [f"{len(head.hidden)} hidden layer{'s' if len(head.hidden) > 1 else ''}"] if head.hidden else []
        lost += [f"the {head.layers[-1].activation} after the output layer"] if head.layers and head.layers[-1].activation else []
        return f"transformers' MobileNet has a single Linear classifier returning logits: this head ({head.describe()}) would lose {' and '.join(lost)}"
    pads = {layer.pad for block in arch.blocks for layer in block.layers}
    if pads not in ({"same"}, {"symmetric"}):
        return f"transformers pads all layers alike (tf_padding), these weights use {sorted(map(str, pads))}"
    if arch.arch == "v1" and arch.blocks[-1].layers[0].role == "head":
        return "transformers' MobileNetV1 has no head convolution"
    if arch.arch == "v2":
        if len(arch.blocks) != 19:
            return f"transformers' MobileNetV2 has 17 inverted residuals, these weights {len(arch.blocks) - 2}"
        if arch.blocks[1].residual:
            return "transformers' first MobileNetV2 block has no residual connection, this one has"
    return None


def write_directory(arch: mobilenet_arch.Architecture, variables: Mapping[str, Any], path: Path, preprocessing_: Preprocessing, config: dict | None = None) -> None:
    """config.json, model.safetensors and preprocessor_config.json, as `from_pretrained` loads them."""
    import safetensors.numpy

    from toolkit.cli import atomic_write, atomic_write_text
    from parity.layouts import from_flax

    config = config or config_for(arch)
    tensors = from_flax(variables, rules(arch))
    # PyTorch's BN step counters, which transformers' models hold
    counters = {r.key.rsplit(".", 1)[0] + ".num_batches_tracked": np.zeros((), np.int64) for r in rules(arch) if r.key.endswith("running_mean")}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors", lambda f: f.write(safetensors.numpy.save({**tensors, **counters}, metadata={"format": "pt"})))
    atomic_write_text(path / "config.json", json.dumps(config, indent=2) + "\n")
    processor = {
        "image_processor_type": f"MobileNet{arch.arch.upper()}ImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": preprocessing_.resize_size},
        "resample": {v: k for k, v in RESAMPLE.items()}.get(preprocessing_.interpolation, 2),
        "do_center_crop": True,
        "crop_size": {"height": preprocessing_.crop_size, "width": preprocessing_.crop_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocessing_.mean),
        "image_std": list(preprocessing_.std),
    }
    atomic_write_text(path / "preprocessor_config.json", json.dumps(processor, indent=2) + "\n")


def cannot_hold(arch: mobilenet_arch.Architecture) -> str | None:
    try:
        config_for(arch)
    except LayoutError as e:
        return str(e)
    return None


def _extension(path: Path) -> bool:
    """Whether the name ends in a file extension (letters), not a dotted part of a model's name
    such as `mobilenet_v2_1.0_224`."""
    return bool(re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]*", path.suffix))  # .h5, .pth; not .0_224 nor .ra_in1k


def write(checkpoint, path: Path, num_batches_tracked: int = 0, extra=None) -> None:
    if path.is_file() or (_extension(path) and not path.is_dir()):
        raise LayoutError(f"{path}: a Hugging Face checkpoint is a directory (config.json, model.safetensors, preprocessor_config.json)")
    config = config_for(checkpoint.architecture)
    if checkpoint.labels:
        config.update(id2label_config(checkpoint.labels))
    write_directory(checkpoint.architecture, checkpoint.variables, path, checkpoint.preprocessing, config)


def id2label_config(labels) -> dict:
    """transformers' `id2label` and `label2id` for these class names (a name that repeats maps back
    to its last index, as transformers' own `label2id` does)."""
    return {"id2label": {str(i): name for i, name in enumerate(labels)}, "label2id": {name: i for i, name in enumerate(labels)}}


def labels(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names of a config's `id2label`; None where it holds transformers' placeholders
    (`LABEL_0`, `LABEL_1`, ...: `PretrainedConfig`'s for a model given only `num_labels`)."""
    id2label = config.get("id2label") or {}
    try:
        ids = sorted(id2label, key=int)
    except (TypeError, ValueError):
        return None
    if [int(i) for i in ids] != list(range(len(ids))):
        return None  # not one name per output
    names = tuple(str(id2label[i]) for i in ids)
    if not names or names == tuple(f"LABEL_{i}" for i in range(len(names))):
        return None
    return names


def read_directory(path: Path, ema: bool = False) -> Source | None:
    """A `save_pretrained` directory: config.json, the weights, preprocessor_config.json."""
    from parity import io

    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsFileError(f"{path}: a directory without config.json: expected a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    if "model_type" not in config and "pretrained_cfg" in config:
        return None  # timm's (`push_to_hf_hub`): its own layout reads it
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state_dict = io.load_torch_state_dict(path / name)
            break
    else:
        raise WeightsFileError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    pre = path / "preprocessor_config.json"
    return Source(_under_model_type(io.to_numpy(state_dict), config), config, json.loads(pre.read_text()) if pre.is_file() else None, labels=labels(config))


def _under_model_type(weights: dict, config: Mapping[str, Any]) -> dict:
    """A base model's keys (`MobileNetV2Model`: `conv_stem...`, no classifier) under the prefix the
    classification model nests them in (`mobilenet_v2.`), which the rules name."""
    prefix = f"{config.get('model_type', '')}."
    if prefix not in ("mobilenet_v1.", "mobilenet_v2.") or any(k.startswith(prefix) for k in weights):
        return weights
    return {k if k.startswith("classifier.") else prefix + k: v for k, v in weights.items()}


def of_model(model: Any) -> Source | None:
    """A live transformers model: its config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "state_dict"):
        return None
    from parity import io

    config = config.to_dict()
    return Source(_under_model_type(io.to_numpy(model.state_dict()), config), config, labels=labels(config))


def run_transformers(source: Any, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """transformers itself, `from_pretrained` on the source directory."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    try:
        import transformers
    except ImportError:
        return None
    import torch

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # its "Loading weights" bar would be the tool's output
    model = transformers.AutoModelForImageClassification.from_pretrained(source).eval()
    with torch.no_grad():
        return "transformers", model(pixel_values=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).logits.numpy()


def run_written(path: Path, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """transformers' `from_pretrained` on the directory written."""
    return run_transformers(path, checkpoint, images)


LAYOUT = Layout(
    name=NAME,
    expects=EXPECTS,
    recognise=recognise,
    architecture=architecture,
    rules=rules,
    preprocessing=preprocessing,
    cannot_hold=cannot_hold,
    write=write,
    holds_labels=True,
    writes=lambda path: path.is_dir() or not _extension(path),
    reads=("/",),
    read=read_directory,
    of_model=of_model,
    run_library=run_transformers,
    run_written=run_written,
)
