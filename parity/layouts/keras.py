"""Keras's layout (`keras.applications.MobileNet`, `MobileNetV2`; .keras, .weights.h5 and legacy
.h5 files, all read with h5py alone).

    conv1, conv1_bn / Conv1, bn_Conv1                               stem
    conv_dw_i(_bn), conv_pw_i(_bn)                                  V1 block i
    expanded_conv_depthwise(_BN), expanded_conv_project(_BN)        V2's first block
    block_j_expand(_BN), block_j_depthwise(_BN), block_j_project(_BN)   V2 block j + 1
    Conv_1, Conv_1_bn                                               V2's head
    conv_preds (1x1 conv with bias, V1) / predictions (Dense, V2)   classifier

Kernels are HWIO already; a depthwise kernel is (k, k, C, 1). Padding is TensorFlow SAME except
before the stride-2 depthwise layers, where a ZeroPadding2D fixed when the model was built pads
((0, 1), (0, 1)) (V1 always; V2 at even sizes, ((1, 1), (1, 1)) at odd ones): read from the
file's config where it has one, else assumed ((0, 1), (0, 1)), as every published file was built
at an even size. BatchNorm epsilon 1e-3.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
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
from toolkit.cli import first_line

NAME = "keras"
EXPECTS = "conv1/kernel + conv_dw_1/kernel (MobileNet) or Conv1/kernel + expanded_conv_depthwise/kernel (MobileNetV2)"
KERAS_BN = ("gamma", "beta", "moving_mean", "moving_variance")
EVEN_SIZE_PAD = ((0, 1), (0, 1))
EPSILON = mobilenet_arch.TF_BN_EPSILON


def recognise(keys) -> bool:
    keys = set(keys)
    return {"conv1/kernel", "conv_dw_1/kernel"} <= keys or {"Conv1/kernel", "expanded_conv_depthwise/kernel"} <= keys


def _padding(s2_pads):
    pads = iter(s2_pads or ())

    def pad(role: str, stride: int):
        if role == "depthwise" and stride == 2:
            return next(pads, EVEN_SIZE_PAD)
        return "same"

    return pad


def architecture(weights: Mapping[str, Any], config: Mapping[str, Any] | None = None, **kw) -> mobilenet_arch.Architecture:
    """`config`: {"s2_pads": [ZeroPadding2D paddings in order], "dropout": rate}, where known."""
    config = dict(config or {})
    kw.setdefault("padding", _padding(config.get("s2_pads")))
    kw.setdefault("bn_epsilon", config.get("epsilon", EPSILON))
    if "conv1/kernel" in weights:  # MobileNet (V1)
        for i in range(1, 14):
            multiplier = shape(weights, f"conv_dw_{i}/kernel")[-1]
            if multiplier != 1:
                raise LayoutError(
                    f"a Keras MobileNet with depth_multiplier={multiplier} (each depthwise layer {multiplier} outputs per channel): "
                    "not MobileNet as described; the pretrained weights have 1"
                )
        stem = shape(weights, "conv1/kernel")[-1]
        outs = [shape(weights, f"conv_pw_{i}/kernel")[-1] for i in range(1, 14)]
        kw.setdefault("width_mult", round(outs[-1] / 1024, 4))
        kw.setdefault("dropout", float(config.get("dropout", 1e-3)))
        return mobilenet_arch.mobilenet_v1_from_channels(stem, outs, classes(weights, "conv_preds/kernel", -1), **kw)
    blocks = [(None, shape(weights, "expanded_conv_project/kernel")[-1], 1, 0, 0)]
    positions = mobilenet_arch.stage_positions(mobilenet_arch.V2_STAGE_DEPTHS)[1:]
    for j, (stage, repeat) in enumerate(positions, start=1):
        blocks.append((shape(weights, f"block_{j}_expand/kernel")[-1], shape(weights, f"block_{j}_project/kernel")[-1], v2_stride(stage, repeat), stage, repeat))
    kw.setdefault("width_mult", round(blocks[-1][1] / 320, 4))
    kw.setdefault("dropout", float(config.get("dropout", 0.0)))
    head = shape(weights, "Conv_1/kernel")[-1]
    return mobilenet_arch.mobilenet_v2_from_blocks(shape(weights, "Conv1/kernel")[-1], blocks, head, classes(weights, "predictions/kernel", -1), **kw)


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    def names(index: int, block, layer) -> tuple[str, str]:
        if arch.arch == "v1":
            name = "conv1" if layer.role == "stem" else f"conv_{'dw' if layer.role == 'depthwise' else 'pw'}_{index}"
            return f"{name}/kernel", f"{name}_bn"
        if layer.role == "stem":
            return "Conv1/kernel", "bn_Conv1"
        if layer.role == "head":
            return "Conv_1/kernel", "Conv_1_bn"
        name = ("expanded_conv_" if index == 1 else f"block_{index - 1}_") + layer.role
        return f"{name}/kernel", f"{name}_BN"

    out = layer_rules(arch, names, KERAS_BN, conv="same", depthwise="keras_depthwise", sep="/")
    if arch.arch == "v1":
        return out + classifier_rules(arch, "conv_preds/kernel", "conv_preds/bias", "keras_conv_dense")
    return out + classifier_rules(arch, "predictions/kernel", "predictions/bias", "same")


def preprocessing(config=None, arch=None) -> Preprocessing:
    # keras.applications' preprocess_input mode "tf" (x / 127.5 - 1); Keras has no crop convention,
    # TF-slim's evaluation crops 0.875.
    return Preprocessing(INCEPTION_MEAN, INCEPTION_STD, 256, 224, "bilinear")


# ---------------------------------------------------------------- files, with h5py alone

VAR_ORDER = {4: KERAS_BN, 1: ("kernel",), 2: ("kernel", "bias")}  # Keras 3 stores vars/0, vars/1, ...


def read_file(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """({'layer/var': array}, config) of a .keras, .weights.h5 or legacy .h5 file."""
    import h5py


    try:
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as z:
                config = _config_of(json.loads(z.read("config.json")))
                with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
                    return _read_h5(f), config
        with h5py.File(path, "r") as f:
            config = {}
            if "model_config" in f.attrs:  # legacy whole-model .h5
                raw = f.attrs["model_config"]
                config = _config_of(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
            return _read_h5(f), config
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise WeightsFileError(f"{path} is not a readable Keras file (truncated or another format?): {first_line(e)}") from e


def _read_h5(f) -> dict[str, np.ndarray]:
    out = {}
    if "layers" in f and "layer_names" not in f.attrs:  # Keras 3: layers/<class_n>/vars/<i>, the name in attrs
        for group in f["layers"].values():
            variables = group.get("vars")
            if variables is None or not len(variables):
                continue
            name = variables.attrs.get("name")
            if name is None or len(variables) not in VAR_ORDER:
                raise LayoutError("a Keras weights file without layer names: save it with keras 3's save_weights or save")
            for i, leaf in enumerate(VAR_ORDER[len(variables)]):
                out[f"{name}/{leaf}"] = np.array(variables[str(i)])
        return out
    g = f["model_weights"] if "model_weights" in f else f  # legacy: a whole model, or save_weights
    for layer in g.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else layer
        for weight in g[layer].attrs.get("weight_names", []):
            weight = weight.decode() if isinstance(weight, bytes) else weight
            # Keras 2: 'conv_dw_1/depthwise_kernel:0'; Keras 3: 'conv_dw_1/kernel'
            leaf = weight.split(":")[0].split("/")[-1].replace("depthwise_kernel", "kernel")
            out[f"{layer}/{leaf}"] = np.array(g[layer][weight])
    return out


def _config_of(model_config: Mapping[str, Any]) -> dict:
    layers = model_config["config"]["layers"]
    config: dict = {"s2_pads": [tuple(map(tuple, l["config"]["padding"])) for l in layers if l["class_name"] == "ZeroPadding2D"]}
    for l in layers:
        if l["class_name"] == "Dropout":
            config["dropout"] = float(l["config"]["rate"])
        if l["class_name"] == "BatchNormalization":
            config["epsilon"] = float(l["config"]["epsilon"])
    return config


def of_model(model) -> tuple[dict[str, np.ndarray], dict]:
    """(weights, config) of a live keras.applications model."""
    weights = {v.path: np.asarray(v.numpy()) for v in model.weights}
    config: dict = {"s2_pads": [tuple(map(tuple, l.padding)) for l in model.layers if type(l).__name__ == "ZeroPadding2D"]}
    for l in model.layers:
        if type(l).__name__ == "Dropout":
            config["dropout"] = float(l.rate)
    return weights, config


# ---------------------------------------------------------------- writing, through keras itself


def alpha_for(arch: mobilenet_arch.Architecture) -> tuple[float, int]:
    """(alpha, an input size) for which keras.applications builds exactly `arch`, or LayoutError."""
    if arch.bn_epsilon != EPSILON:
        raise LayoutError(f"Keras's MobileNets use BatchNorm epsilon 1e-3, these weights {arch.bn_epsilon:g}")
    s2 = {layer.pad for b in arch.blocks for layer in b.layers if layer.depthwise and layer.stride == 2}
    other = {layer.pad for b in arch.blocks for layer in b.layers if not (layer.depthwise and layer.stride == 2) and layer.kernel_size > 1}
    if other != {"same"} or len(s2) != 1 or next(iter(s2)) not in (EVEN_SIZE_PAD, ((1, 1), (1, 1))):
        if "symmetric" in other:
            raise LayoutError("Keras's MobileNets pad as TensorFlow does, these weights symmetrically (PyTorch's)")
        raise LayoutError(f"Keras fixes each stride-2 padding when it builds the model, these weights pad {sorted(map(str, s2))}")
    size = 224 if next(iter(s2)) == EVEN_SIZE_PAD else 225
    if arch.arch == "v1" and size == 225:
        raise LayoutError("Keras's MobileNet pads ((0, 1), (0, 1)) before every stride-2 layer, these weights ((1, 1), (1, 1))")
    last = arch.blocks[-1 if arch.arch == "v1" else -2].out_channels
    for alpha in (arch.width_mult, arch.blocks[0].out_channels / 32, last / (1024 if arch.arch == "v1" else 320)):
        if not alpha > 0:
            continue
        if arch.arch == "v1":
            c = mobilenet_arch.keras_v1_channels(alpha)
            candidate = mobilenet_arch.mobilenet_v1_from_channels(c.stem, c.outs, arch.num_classes, padding=_padding(()), bn_epsilon=EPSILON)
        else:
            c = mobilenet_arch.keras_v2_channels(alpha)
            pad = _padding([next(iter(s2))] * 4)
            candidate = mobilenet_arch.mobilenet_v2_from_blocks(c.stem, c.blocks, c.head, arch.num_classes, padding=pad, bn_epsilon=EPSILON)
        if same_architecture(candidate, arch):
            return alpha, size
    raise LayoutError("no Keras alpha reproduces these channels (they follow another library's rounding)")


def build_model(arch: mobilenet_arch.Architecture):
    """A keras.applications model whose variables `arch`'s weights fill exactly."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    alpha, size = alpha_for(arch)
    # A feature extractor as Keras builds one: no top, the features pooled as ours are.
    top = {"classes": arch.num_classes, "classifier_activation": None} if arch.num_classes else {"include_top": False, "pooling": "avg"}
    if arch.arch == "v1":
        return keras.applications.MobileNet(input_shape=(size, size, 3), alpha=alpha, weights=None, dropout=arch.dropout, **top)
    return keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, weights=None, **top)


def write_file(arch: mobilenet_arch.Architecture, variables: Mapping[str, Any], path: Path) -> None:
    """.keras (a whole model) or .weights.h5 (its weights), through keras."""
    from toolkit.cli import atomic_write
    from parity.layouts import from_flax

    if not (path.name.lower().endswith(".weights.h5") or path.suffix.lower() == ".keras"):
        raise LayoutError(f"{path}: Keras writes .keras or .weights.h5")
    model = build_model(arch)
    values = from_flax(variables, rules(arch))
    by_path = {v.path: v for v in model.weights}
    for key, value in values.items():
        by_path[key].assign(value.astype(np.float32))
    # keras decides the format from the name, so it writes a temporary of the same kind, renamed whole
    suffix = ".keras" if path.suffix.lower() == ".keras" else ".weights.h5"

    def write(f):
        import tempfile

        with tempfile.TemporaryDirectory(dir=path.parent) as d:
            tmp = Path(d) / f"model{suffix}"
            model.save(tmp) if suffix == ".keras" else model.save_weights(tmp)
            f.write(tmp.read_bytes())

    atomic_write(path, write)


def cannot_hold(arch: mobilenet_arch.Architecture) -> str | None:
    try:
        alpha_for(arch)
    except LayoutError as e:
        return str(e)
    return None


def read(path: Path, ema: bool = False) -> Source:
    weights, config = read_file(path)
    return Source(weights, config)


def live_model(model: Any) -> Source | None:
    """A live Keras model (it has `weights` and `layers`, and no torch `state_dict`)."""
    if not (hasattr(model, "weights") and hasattr(model, "layers")) or hasattr(model, "state_dict"):
        return None
    weights, config = of_model(model)
    return Source(weights, config, None, NAME)


def write(checkpoint, path: Path, num_batches_tracked: int = 0, extra=None) -> None:
    write_file(checkpoint.architecture, checkpoint.variables, path)


def run_keras(source: Any, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Keras itself on a `.keras` file (the one kind that holds its model, not only weights)."""
    if not isinstance(source, (str, os.PathLike)) or Path(source).suffix != ".keras":
        return None
    try:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras
    except ImportError:
        return None
    return "keras", np.asarray(keras.saving.load_model(source)(images, training=False))


def run_written(path: Path, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Keras itself: `load_model` on a .keras file; a .weights.h5 loaded into the model Keras
    builds for the architecture."""
    try:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras
    except ImportError:
        return None
    if path.suffix.lower() == ".keras":
        model = keras.saving.load_model(path)
    else:
        model = build_model(checkpoint.architecture)
        model.load_weights(path)
    return "keras", np.asarray(model(images, training=False))


LAYOUT = Layout(
    name=NAME,
    expects=EXPECTS,
    recognise=recognise,
    architecture=architecture,
    rules=rules,
    preprocessing=preprocessing,
    cannot_hold=cannot_hold,
    write=write,
    writes=lambda path: path.name.lower().endswith((".keras", ".weights.h5")),
    reads=(".keras", ".h5"),
    read=read,
    of_model=live_model,
    run_library=run_keras,
    run_written=run_written,
)
