"""Keras's layout (`keras.applications.MobileNet`, `MobileNetV2`, and models built around them;
.keras, .weights.h5 and legacy .h5 files, all read with h5py alone).

    conv1, conv1_bn / Conv1, bn_Conv1                               stem
    conv_dw_i(_bn), conv_pw_i(_bn)                                  V1 block i
    expanded_conv_depthwise(_BN), expanded_conv_project(_BN)        V2's first block
    block_j_expand(_BN), block_j_depthwise(_BN), block_j_project(_BN)   V2 block j + 1
    Conv_1, Conv_1_bn                                               V2's head
    conv_preds (1x1 conv with bias, V1) / predictions (Dense, V2)   keras.applications' classifier
    <keras_name>/kernel, /bias                                      a user's Dense layers

The backbone may sit nested (once or more) in the user's Functional or Sequential model, or inline
in it; the head is the chain of layers after the backbone's last (`out_relu`, `conv_pw_13_relu`),
read from the model's config (`_head`): pooling, Dropout, Dense layers and their activations, and
a final softmax. A .weights.h5 has no config: its head is read by names and shapes
(`head_of_weights`).

Kernels are HWIO already; a depthwise kernel is (k, k, C, 1). Padding is TensorFlow SAME except
before the stride-2 depthwise layers, where a ZeroPadding2D fixed when the model was built pads
((0, 1), (0, 1)) (V1 always; V2 at even sizes, ((1, 1), (1, 1)) at odd ones): read from the
file's config where it has one, else assumed ((0, 1), (0, 1)), as every published file was built
at an even size. BatchNorm epsilon 1e-3.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
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
    chained,
    classes,
    head_rules,
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
    """`config`: {"s2_pads": [ZeroPadding2D paddings in order], "epsilon", "head": the Head read
    from the model's config}, where known; without a head, it is read from the weights' names and
    shapes (`head_of_weights`)."""
    config = dict(config or {})
    dropout = kw.pop("dropout", None)
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
        arch = mobilenet_arch.mobilenet_v1_from_channels(stem, outs, 0, **kw)
    else:
        blocks = [(None, shape(weights, "expanded_conv_project/kernel")[-1], 1, 0, 0)]
        positions = mobilenet_arch.stage_positions(mobilenet_arch.V2_STAGE_DEPTHS)[1:]
        for j, (stage, repeat) in enumerate(positions, start=1):
            blocks.append((shape(weights, f"block_{j}_expand/kernel")[-1], shape(weights, f"block_{j}_project/kernel")[-1], v2_stride(stage, repeat), stage, repeat))
        kw.setdefault("width_mult", round(blocks[-1][1] / 320, 4))
        head = shape(weights, "Conv_1/kernel")[-1]
        arch = mobilenet_arch.mobilenet_v2_from_blocks(shape(weights, "Conv1/kernel")[-1], blocks, head, 0, **kw)
    head = config["head"] if "head" in config else head_of_weights(weights, arch, config.get("where"))
    layers = head.layers
    if len(layers) == 1 and layers[0].keras_name == TOP[arch.arch] and layers[0].activation is None:
        # keras.applications' own classifier for this version (a V1 model's own Dense named
        # `predictions` is the user's, whose name must stay).
        head = dataclasses.replace(head, layers=(dataclasses.replace(layers[0], keras_name=""),))
    arch = mobilenet_arch.with_head(arch, head)
    return arch if dropout is None else mobilenet_arch.with_dropout(arch, dropout)


# keras.applications' own classifier: V1's 1x1 convolution on the pooled map, V2's Dense.
TOP = {"v1": "conv_preds", "v2": "predictions"}
# Keras's activation names -> the head's (None: linear); "softmax" only as the output's.
ACTIVATIONS = {None: None, "linear": None, "relu": "relu", "relu6": "relu6", "gelu": "gelu", "silu": "silu", "swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "softmax": "softmax"}


def head_of_weights(weights: Mapping[str, Any], arch: mobilenet_arch.Architecture, where: str | None = None) -> mobilenet_arch.Head:
    """The head of weights with no model config (a .weights.h5): keras.applications' own
    classifier by its name, else the Dense layers (a 2-D `X/kernel` and its `X/bias`) chained by
    shapes from the backbone's features, ReLU assumed between them and the output linear (a weights
    file holds no activations), with a note saying so."""
    if arch.arch == "v1" and f"{TOP['v1']}/kernel" in weights:  # with keras.applications.MobileNet's default dropout
        return mobilenet_arch.Head((mobilenet_arch.Dense(classes(weights, f"{TOP['v1']}/kernel", -1), 1e-3),))
    dense = {k[: -len("/kernel")]: shape(weights, k) for k in weights if k.endswith("/kernel") and len(shape(weights, k)) == 2 and k[: -len("kernel")] + "bias" in weights}
    chain = chained(dense, arch.num_features)
    if not chain:
        return mobilenet_arch.Head()
    if [name for name, _ in chain] == [TOP[arch.arch]]:  # keras.applications.MobileNetV2's own
        return mobilenet_arch.Head((mobilenet_arch.Dense(chain[0][1]),))
    layers = tuple(mobilenet_arch.Dense(units, 0.0, "relu" if i < len(chain) - 1 else None, keras_name=name) for i, (name, units) in enumerate(chain))
    if where is not None:
        warnings.warn(
            f"{where} holds weights without the model's config: its head ({', '.join(n for n, _ in chain)}) is chained by shapes, "
            "ReLU assumed between layers, no dropout and no softmax; read the .keras or .h5 model file for them",
            stacklevel=2,
        )
    return mobilenet_arch.check_head(mobilenet_arch.Head(layers))


def keras_names(arch: mobilenet_arch.Architecture) -> tuple[str, ...]:
    """Each dense layer's Keras name: the source's, else keras.applications' classifier for a
    single linear layer (`canonical`), else `dense`, `dense_1`, ... and `predictions`."""
    if canonical(arch):
        return (TOP[arch.arch],)
    layers = arch.head.layers
    defaults = [f"dense_{i}" if i else "dense" for i in range(len(layers) - 1)] + ["predictions"]
    return tuple(layer.keras_name or default for layer, default in zip(layers, defaults))


def canonical(arch: mobilenet_arch.Architecture) -> bool:
    """A head keras.applications builds itself (include_top): one linear layer no source named
    otherwise."""
    layers = arch.head.layers
    return len(layers) == 1 and layers[0].activation is None and layers[0].keras_name == ""


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
    for rule in head_rules(arch, keras_names(arch), "same", kernel="kernel", sep="/"):
        # V1's classifier is a 1x1 convolution on the pooled map: a dense layer of another shape
        out.append(dataclasses.replace(rule, transform="keras_conv_dense") if rule.key == f"{TOP['v1']}/kernel" else rule)
    return out


def preprocessing(input_size=None, arch=None) -> Preprocessing:
    """keras.applications' preprocess_input mode "tf" (x / 127.5 - 1). A model with a fixed input
    size is fed whole images resized to it (Keras's image utilities resize, never crop); with
    none, TF-slim's evaluation crop of 0.875."""
    if isinstance(input_size, Preprocessing):  # a hub entry's own
        return input_size
    if input_size:
        return Preprocessing(INCEPTION_MEAN, INCEPTION_STD, input_size, input_size, "bilinear", resize="whole")
    return Preprocessing(INCEPTION_MEAN, INCEPTION_STD, 256, 224, "bilinear")


# ---------------------------------------------------------------- the model's config: backbone and head

CONTAINERS = ("Functional", "Sequential", "Model")
# The backbone's last layer (include_top=False, pooling=None): everything after it is the head.
BACKBONE_ENDS = ("out_relu", "conv_pw_13_relu")


@dataclass
class _Entry:
    """One layer of a Keras model config, nested models flattened into their layers."""

    class_name: str
    name: str
    config: dict
    inbound: list[str] | None  # the layers it takes its input from; None in a Sequential
    ends: set = field(default_factory=set)  # the nested models whose output it is


def _entries(model: Mapping[str, Any]) -> list[_Entry]:
    out: list[_Entry] = []
    functional = model["class_name"] != "Sequential"
    for layer in model["config"]["layers"]:
        name = layer.get("name") or layer["config"].get("name", "")
        if layer["class_name"] in CONTAINERS:
            inner = _entries(layer)
            if inner:
                inner[-1].ends.add(name)
            out += inner
            continue
        inbound = sorted(set(_inbound(layer.get("inbound_nodes", [])))) if functional else None
        out.append(_Entry(layer["class_name"], name, layer["config"], inbound))
    return out


def _inbound(nodes) -> list[str]:
    """Names of the layers in a config's inbound_nodes: Keras 3's `keras_history`, Keras 2's
    `[name, node, tensor, kwargs]` lists."""
    if isinstance(nodes, dict):
        if "keras_history" in nodes:
            return [nodes["keras_history"][0]]
        return [n for value in nodes.values() for n in _inbound(value)]
    if isinstance(nodes, (list, tuple)):  # tuples in a live model's get_config
        if len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
            return [nodes[0]]
        return [n for value in nodes for n in _inbound(value)]
    return []


def _config_of(model_config: Mapping[str, Any]) -> dict:
    """What the model's config says: the stride-2 paddings, BatchNorm epsilon, the head, and the
    input size where the model fixes one."""
    entries = _entries(model_config)
    ends = [i for i, e in enumerate(entries) if e.name in BACKBONE_ENDS]
    if not ends:
        found = ", ".join(f"{e.name} ({e.class_name})" for e in entries[:4])
        raise LayoutError(f"a Keras model without a MobileNet's last layer ({' or '.join(BACKBONE_ENDS)}): layers {found}...")
    backbone, head = entries[: ends[-1] + 1], entries[ends[-1] + 1 :]
    config: dict = {
        "s2_pads": [tuple(map(tuple, e.config["padding"])) for e in backbone if e.class_name == "ZeroPadding2D"],
        "head": _head(head, {backbone[-1].name} | backbone[-1].ends),
        "input_size": _input_size(entries),
    }
    epsilons = [float(e.config["epsilon"]) for e in backbone if e.class_name == "BatchNormalization"]
    if epsilons:
        config["epsilon"] = epsilons[0]
    return config


def _input_size(entries: list[_Entry]) -> int | None:
    for e in entries:
        shape_ = e.config.get("batch_shape") or e.config.get("batch_input_shape")
        if shape_:
            h, w = shape_[1:3]
            return int(h) if h is not None and h == w else None
    return None


def _activation(value: Any, where: str) -> str | None:
    if isinstance(value, dict):  # a serialised function: {"class_name": "function", "config": "relu"}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name", "an object")
    if not (value is None or isinstance(value, str)) or value not in ACTIVATIONS:
        raise LayoutError(f"{where}: activation {value!r} in the head: expected one of {', '.join(k for k in ACTIVATIONS if k)}")
    return ACTIVATIONS[value]


def _head(entries: list[_Entry], after: set) -> mobilenet_arch.Head:
    """The head from the layers after the backbone, in order: GlobalAveragePooling2D (inside a
    backbone built with pooling="avg" too), Dropout (onto the next Dense), Dense or V1's 1x1
    `conv_preds`, activations (a separate Activation/ReLU onto the Dense before it), Reshape or
    Flatten of pooled features, and a final softmax (the output). One chain, nothing else."""
    layers: list[mobilenet_arch.Dense] = []
    dropout, pooled, softmax = 0.0, False, None
    for e in entries:
        where = f"Keras layer {e.name!r} ({e.class_name})"
        if e.class_name == "InputLayer":
            after.add(e.name)
            continue
        if e.inbound is not None and (len(e.inbound) != 1 or e.inbound[0] not in after):
            raise LayoutError(f"{where} takes its input from {', '.join(e.inbound) or 'nothing'}, not from the layer before it: a head with branches cannot be read")
        after = {e.name} | e.ends
        if softmax is not None and e.class_name not in ("Reshape", "Flatten", "Dropout"):
            raise LayoutError(f"{where} after the softmax ({softmax}): only a softmax may end the head")
        if e.class_name == "GlobalAveragePooling2D" and not pooled:
            pooled = True
        elif e.class_name in ("Reshape", "Flatten") and pooled:
            if e.class_name == "Reshape" and len(e.config["target_shape"]) != 1:
                raise LayoutError(f"{where} to {tuple(e.config['target_shape'])} in the head: expected a reshape to one axis")
        elif e.class_name == "Dropout":
            rate = float(e.config["rate"])
            dropout = 1 - (1 - dropout) * (1 - rate) if dropout else rate  # two in a row drop as one
        elif not pooled:
            raise LayoutError(f"{where} before any GlobalAveragePooling2D: a MobileNet's head pools the features first")
        elif e.class_name == "Dense" or (e.class_name == "Conv2D" and e.name == TOP["v1"] and tuple(e.config["kernel_size"]) == (1, 1)):
            if not e.config.get("use_bias", True):
                raise LayoutError(f"{where} without a bias: the head's dense layers have one")
            if layers and layers[-1].activation == "softmax":
                raise LayoutError(f"Keras layer {layers[-1].keras_name!r}: a softmax before the last layer cannot be read")
            units = e.config["units"] if e.class_name == "Dense" else e.config["filters"]
            layers.append(mobilenet_arch.Dense(int(units), dropout, _activation(e.config.get("activation"), where), keras_name=e.name))
            dropout = 0.0
        elif e.class_name in ("Activation", "ReLU", "Softmax") and layers and layers[-1].activation is None:
            if e.class_name == "Softmax":
                activation = "softmax"
            elif e.class_name == "ReLU":
                c = e.config
                if c.get("negative_slope") or c.get("threshold") or c.get("max_value") not in (None, 6, 6.0):
                    raise LayoutError(f"{where}: a leaky or thresholded ReLU in the head cannot be read")
                activation = "relu6" if c.get("max_value") else "relu"
            else:
                activation = _activation(e.config["activation"], where)
            layers[-1] = dataclasses.replace(layers[-1], activation=activation)
        else:
            raise LayoutError(f"{where} in the head: a MobileNet's head is pooling, then Dropout and Dense layers (with activations), then an optional softmax")
        if layers and layers[-1].activation == "softmax":
            softmax = e.name
    output = "none"
    if layers and layers[-1].activation == "softmax":
        layers[-1], output = dataclasses.replace(layers[-1], activation=None), "softmax"
    return mobilenet_arch.check_head(mobilenet_arch.Head(tuple(layers), output))


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
            config = {"where": str(path)}  # weights alone: a note if their head is guessed
            if "model_config" in f.attrs:  # legacy whole-model .h5
                raw = f.attrs["model_config"]
                config = _config_of(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
            return _read_h5(f), config
    except (OSError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise WeightsFileError(f"{path} is not a readable Keras file (truncated or another format?): {first_line(e)}") from e


def _read_h5(f) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if "layers" in f and "layer_names" not in f.attrs:  # Keras 3: layers/<class_n>/vars/<i>, nested models' under their layers/
        _read_keras3(f["layers"], out)
        return out
    g = f["model_weights"] if "model_weights" in f else f  # legacy: a whole model, or save_weights
    for layer in g.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else layer
        for weight in g[layer].attrs.get("weight_names", []):
            weight = weight.decode() if isinstance(weight, bytes) else weight
            # Keras 2: 'conv_dw_1/depthwise_kernel:0'; Keras 3: 'conv_dw_1/kernel'; in a nested
            # model 'mobilenetv2_1.00_160/Conv1/kernel:0' or 'Conv1/kernel' under the model's group
            name, leaf = weight.split(":")[0].split("/")[-2:]
            _put(out, f"{name}/{leaf.replace('depthwise_kernel', 'kernel')}", np.array(g[layer][weight]))
    return out


def _read_keras3(layers, out: dict) -> None:
    for group in layers.values():
        if "layers" in group:  # a nested Functional or Sequential model
            _read_keras3(group["layers"], out)
        variables = group.get("vars")
        if variables is None or not len(variables):
            continue
        name = variables.attrs.get("name")
        if name is None or len(variables) not in VAR_ORDER:
            raise LayoutError("a Keras weights file without layer names: save it with keras 3's save_weights or save")
        for i, leaf in enumerate(VAR_ORDER[len(variables)]):
            _put(out, f"{name}/{leaf}", np.array(variables[str(i)]))


def _put(out: dict, key: str, value: np.ndarray) -> None:
    if key in out:
        raise LayoutError(f"two Keras layers named {key.split('/')[0]!r}: rename one (layer names must be unique to be read)")
    out[key] = value


def of_model(model) -> tuple[dict[str, np.ndarray], dict]:
    """(weights, config) of a live Keras model: keras.applications' own or one nesting it."""
    weights: dict[str, np.ndarray] = {}
    for v in model.weights:
        _put(weights, "/".join(v.path.split("/")[-2:]), np.asarray(v.numpy()))
    try:
        model_config = {"class_name": type(model).__name__, "config": model.get_config()}
        model_config["config"]["layers"]
    except (NotImplementedError, KeyError):  # a subclassed model: no config of its layers
        return weights, {"where": f"a live {type(model).__name__}"}
    return weights, _config_of(model_config)


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
        if same_architecture(mobilenet_arch.with_head(candidate, arch.head), arch):
            return alpha, size
    raise LayoutError("no Keras alpha reproduces these channels (they follow another library's rounding)")


def build_model(arch: mobilenet_arch.Architecture, input_size: int | None = None):
    """A Keras model whose variables `arch`'s weights fill exactly: keras.applications' own where
    the head is its classifier (or none), else its backbone (include_top=False) nested in a
    Functional model with the head's layers after it, named as `keras_names` says. `input_size`:
    the input the model is fixed to (224, or 225 for odd-size padding, where not given)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    alpha, size = alpha_for(arch)
    if input_size and input_size % 2 == size % 2:  # the padding Keras fixes follows the size's parity
        size = input_size
    build = keras.applications.MobileNet if arch.arch == "v1" else keras.applications.MobileNetV2
    common = {"input_shape": (size, size, 3), "alpha": alpha, "weights": None}
    softmax = "softmax" if arch.head.output == "softmax" else None
    if not arch.num_classes:  # a feature extractor as Keras builds one: no top, the features pooled as ours are
        return build(include_top=False, pooling="avg", **common)
    if canonical(arch):
        extra = {"dropout": arch.dropout} if arch.arch == "v1" else {}
        return build(classes=arch.num_classes, classifier_activation=softmax, **common, **extra)
    backbone = build(include_top=False, **common)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    layers = arch.head.layers
    for i, (layer, name) in enumerate(zip(layers, keras_names(arch))):
        if layer.dropout:
            x = keras.layers.Dropout(layer.dropout)(x)
        # The output layer's own activation (a sigmoid, say) where the head's output is not softmax.
        x = keras.layers.Dense(layer.units, activation=(softmax if i == len(layers) - 1 else None) or layer.activation, name=name)(x)
    return keras.Model(inputs, x)


def write_file(arch: mobilenet_arch.Architecture, variables: Mapping[str, Any], path: Path, input_size: int | None = None) -> None:
    """.keras (a whole model) or .weights.h5 (its weights), through keras."""
    from toolkit.cli import atomic_write
    from parity.layouts import from_flax

    if not (path.name.lower().endswith(".weights.h5") or path.suffix.lower() == ".keras"):
        raise LayoutError(f"{path}: Keras writes .keras or .weights.h5")
    model = build_model(arch, input_size)
    values = from_flax(variables, rules(arch))
    by_key = {"/".join(v.path.split("/")[-2:]): v for v in model.weights}
    for key, value in values.items():
        by_key[key].assign(value.astype(np.float32))
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
    return Source(weights, config, config.get("input_size"))


def live_model(model: Any) -> Source | None:
    """A live Keras model (it has `weights` and `layers`, and no torch `state_dict`)."""
    if not (hasattr(model, "weights") and hasattr(model, "layers")) or hasattr(model, "state_dict"):
        return None
    weights, config = of_model(model)
    return Source(weights, config, config.get("input_size"), NAME)


def write(checkpoint, path: Path, num_batches_tracked: int = 0, extra=None) -> None:
    pre = checkpoint.preprocessing
    write_file(checkpoint.architecture, checkpoint.variables, path, pre.crop_size if pre.resize == "whole" else None)


def _keras():
    try:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras
    except ImportError:
        return None
    return keras


def _outputs(model, images: np.ndarray) -> np.ndarray:
    """What the model returns; a feature map (include_top=False, no pooling) pooled as ours is."""
    out = np.asarray(model(images, training=False))
    return out.mean(axis=(1, 2)) if out.ndim == 4 else out


def run_keras(source: Any, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Keras itself on a file that holds its model (.keras, a whole-model legacy .h5) or a live
    model: its own outputs (probabilities where it ends in softmax)."""
    keras = _keras()
    if keras is None:
        return None
    if hasattr(source, "layers") and hasattr(source, "weights"):
        return "keras", _outputs(source, images)
    if not isinstance(source, (str, os.PathLike)) or Path(source).suffix.lower() not in (".keras", ".h5") or str(source).lower().endswith(".weights.h5"):
        return None
    if Path(source).suffix.lower() == ".h5" and not _holds_model(Path(source)):
        return None
    return "keras", _outputs(keras.saving.load_model(source, compile=False), images)


def _holds_model(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return "model_config" in f.attrs


def run_written(path: Path, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Keras itself: `load_model` on a .keras file; a .weights.h5 loaded into the model Keras
    builds for the architecture. Its outputs: probabilities where the head ends in softmax."""
    keras = _keras()
    if keras is None:
        return None
    if path.suffix.lower() == ".keras":
        model = keras.saving.load_model(path, compile=False)
    else:
        pre = checkpoint.preprocessing
        model = build_model(checkpoint.architecture, pre.crop_size if pre.resize == "whole" else None)
        model.load_weights(path)
    return "keras", _outputs(model, images)


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
    returns_output=True,
)
