"""Keras models as users hold them: a keras.applications backbone nested in their own Functional or
Sequential model with a transfer-learned head, saved as a legacy .h5, .keras or .weights.h5, or
live; headless feature extractors; keras.applications' own softmax top. Each is read, run against
Keras itself, written back and read again. The Keras models are built once per run (building one
takes seconds) with random weights and BatchNorm statistics; nothing is downloaded."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported anywhere

import jax
import numpy as np
import pytest

import mobilenet_arch
import parity
from parity import convert
from parity.models import relative_l2
from tests.cli_errors import assert_one_line_error
from tests.shared import built_once

keras = pytest.importorskip("keras")

SIZE = 96  # keras.applications' smallest input with its own weights' sizes; even: Keras pads ((0, 1), (0, 1))
# float32 rounding only: the same arithmetic in another order (2e-6 measured on the flat models of
# test_layouts_keras.py); a wrong padding, activation or head order is 1e-1 or more.
TOLERANCE = 1e-5
FORMATS = ("h5", "keras", "weights.h5")


def randomised(model, seed: int):
    """Every variable drawn at random (kernels at He scale, BatchNorm statistics away from 0 and 1),
    so that a misplaced weight or statistic shows in the outputs."""
    rng = np.random.default_rng(seed)
    ranges = {"gamma": (0.5, 1.5), "beta": (-0.2, 0.2), "moving_mean": (-0.5, 0.5), "moving_variance": (0.5, 2.0)}
    for v in model.weights:
        leaf, shape = v.path.split("/")[-1], tuple(v.shape)
        if leaf in ranges:
            value = rng.uniform(*ranges[leaf], shape)
        elif leaf == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:  # a kernel: conv (k, k, in, out), depthwise (k, k, C, 1), dense (in, out)
            fan = np.prod(shape[:-1]) if len(shape) == 2 else np.prod(shape[:2]) * shape[-1]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan)
        v.assign(value.astype(np.float32))
    return model


def nested(backbone, *head, sequential: bool = False):
    if sequential:
        return keras.Sequential([keras.Input((SIZE, SIZE, 3)), backbone, *head])
    inputs = keras.Input((SIZE, SIZE, 3))
    x = backbone(inputs)
    for layer in head:
        x = layer(x)
    return keras.Model(inputs, x)


def build_models():
    """{name: Keras model}; the V2 backbone is one model shared by the nested ones."""
    L = keras.layers
    v2 = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.35)
    v1 = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.25)
    models = {
        "v2_softmax": nested(v2, L.GlobalAveragePooling2D(), L.Dropout(0.3), L.Dense(7, activation="softmax", name="dense")),
        "v2_hidden": nested(v2, L.GlobalAveragePooling2D(), L.Dense(32, activation="relu", name="hidden"), L.Dropout(0.2), L.Dense(5, name="logits")),
        # The user's own Dense under the name of keras.applications' V2 classifier (V1's is `conv_preds`).
        "v1_softmax": nested(v1, L.GlobalAveragePooling2D(), L.Dropout(0.3), L.Dense(7, activation="softmax", name="predictions")),
        "v2_sequential": nested(v2, L.GlobalAveragePooling2D(), L.Dense(6, name="scores"), L.Softmax(), sequential=True),
        # the backbone's layers inline (built from its output), activations as layers too
        "v2_flat": keras.Model(v2.input, L.Dense(4, name="out")(L.ReLU(6.0)(L.Dense(8, name="fc2")(L.Dense(16, activation="gelu", name="fc")(L.GlobalAveragePooling2D()(v2.output)))))),
        "headless_map": v2,  # include_top=False, no pooling: its output is the feature map
        "headless_avg": keras.applications.MobileNetV2(include_top=False, pooling="avg", weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.35),
        "canonical": keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.35, classes=10),  # softmax, its default
        "bn_head": nested(v2, L.GlobalAveragePooling2D(), L.BatchNormalization(name="head_bn"), L.Dense(3, name="out")),
    }
    for seed, model in enumerate({id(m): m for m in models.values()}.values()):
        randomised(model, seed)
    return models


HEADS = ("v2_softmax", "v2_hidden", "v1_softmax", "v2_sequential")
READABLE = HEADS + ("v2_flat", "headless_map", "headless_avg", "canonical")


@pytest.fixture(scope="session")
def models():
    return build_models()


@pytest.fixture(scope="session")
def saved(tmp_path_factory, models):
    """Each model saved in each format, with a batch and Keras's own outputs on it."""

    def build(root):
        root.mkdir(parents=True)
        x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
        np.save(root / "x.npy", x)
        for name, model in models.items():
            out = np.asarray(model(x, training=False))
            np.save(root / f"{name}.npy", out.mean(axis=(1, 2)) if out.ndim == 4 else out)
            model.save(root / f"{name}.keras")
            if name in READABLE:
                model.save(root / f"{name}.h5")
                model.save_weights(root / f"{name}.weights.h5")

    return built_once(tmp_path_factory, "keras_heads", build)


def outputs(saved, name):
    return np.load(saved / "x.npy"), np.load(saved / f"{name}.npy")


@pytest.mark.parametrize("form", ["h5", "keras", "live"])
@pytest.mark.parametrize("name", READABLE)
def test_outputs_match_keras(saved, models, name, form, record_property):
    ckpt = parity.load(models[name] if form == "live" else saved / f"{name}.{form}")
    x, reference = outputs(saved, name)
    error = relative_l2(ckpt.outputs(x), reference)  # Keras's own: probabilities where it ends in softmax
    record_property("relative_l2", error)
    assert error <= TOLERANCE
    assert ckpt.preprocessing.resize == "whole" and ckpt.preprocessing.crop_size == SIZE  # Keras's fixed input, resized whole


def test_the_head_is_read_with_its_names_dropout_and_softmax(saved):
    D = mobilenet_arch.Dense
    heads = {name: parity.load(saved / f"{name}.keras").architecture.head for name in READABLE}
    assert heads["v2_softmax"] == mobilenet_arch.Head((D(7, 0.3, None, keras_name="dense"),), "softmax")
    assert heads["v2_hidden"] == mobilenet_arch.Head((D(32, 0.0, "relu", keras_name="hidden"), D(5, 0.2, None, keras_name="logits")))
    assert heads["v2_flat"] == mobilenet_arch.Head((D(16, 0.0, "gelu", keras_name="fc"), D(8, 0.0, "relu6", keras_name="fc2"), D(4, keras_name="out")))
    assert heads["v2_sequential"] == mobilenet_arch.Head((D(6, keras_name="scores"),), "softmax")
    assert heads["canonical"] == mobilenet_arch.Head((D(10),), "softmax")  # keras.applications' own `predictions`
    assert heads["headless_map"] == heads["headless_avg"] == mobilenet_arch.Head()


@pytest.mark.parametrize("name", HEADS + ("canonical",))
def test_weights_file_has_the_model_files_weights(saved, name):
    """A .weights.h5 holds no config: its head is chained by shapes (no softmax, ReLU between), said in a note."""
    whole = parity.load(saved / f"{name}.keras")
    with pytest.warns(UserWarning, match="without the model's config") if name != "canonical" else _no_warning():
        weights = parity.load(saved / f"{name}.weights.h5")
    assert parity.layouts.same_architecture(weights.architecture, whole.architecture)
    for a, b in zip(jax.tree.leaves(weights.variables), jax.tree.leaves(whole.variables), strict=True):
        assert np.array_equal(a, b)


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


@pytest.mark.parametrize("name", ["v2_softmax", "v2_hidden", "v2_flat", "v1_softmax", "canonical"])
def test_written_keras_file_round_trips_and_runs_as_the_source(saved, tmp_path, name, record_property):
    ckpt = parity.load(saved / f"{name}.keras")
    parity.save(ckpt, tmp_path / "out.keras")
    again = parity.load(tmp_path / "out.keras")
    assert again.architecture == ckpt.architecture  # the head's names, dropout and softmax included
    for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(ckpt.variables), strict=True):
        assert np.array_equal(a, b)
    x, reference = outputs(saved, name)
    written = np.asarray(keras.saving.load_model(tmp_path / "out.keras", compile=False)(x, training=False))
    error = relative_l2(written, reference)
    record_property("relative_l2", error)
    assert error <= TOLERANCE


def test_an_output_layers_own_activation_is_written(saved, tmp_path):
    # A binary-style head: a sigmoid on the output layer itself, no softmax output.
    ckpt = parity.load(saved / "v2_softmax.keras")
    head = mobilenet_arch.Head((mobilenet_arch.Dense(7, 0.3, "sigmoid", keras_name="dense"),))
    ckpt = dataclasses.replace(ckpt, architecture=mobilenet_arch.with_head(ckpt.architecture, head))
    ckpt = dataclasses.replace(ckpt, model=type(ckpt.model)(ckpt.architecture))
    parity.save(ckpt, tmp_path / "out.keras")
    assert parity.load(tmp_path / "out.keras").architecture.head == head
    x, _ = outputs(saved, "v2_softmax")
    written = np.asarray(keras.saving.load_model(tmp_path / "out.keras", compile=False)(x, training=False))
    assert relative_l2(written, ckpt.outputs(x)) <= TOLERANCE


@pytest.mark.parametrize("names", [("hidden", "logits"), ("", "")])
def test_written_weights_file_round_trips(saved, tmp_path, names):
    ckpt = parity.load(saved / "v2_hidden.keras")
    # ("", ""): as a PyTorch source's head comes, named by no Keras model: Keras's default names
    layers = tuple(dataclasses.replace(layer, keras_name=name) for layer, name in zip(ckpt.architecture.head.layers, names))
    ckpt = dataclasses.replace(ckpt, architecture=mobilenet_arch.with_head(ckpt.architecture, mobilenet_arch.Head(layers)))
    parity.save(ckpt, tmp_path / "out.weights.h5")
    with pytest.warns(UserWarning, match="ReLU assumed between layers"):  # the hidden layer's ReLU, as the source's
        again = parity.load(tmp_path / "out.weights.h5")
    assert [l.keras_name for l in again.architecture.head.layers] == ([*names] if names[0] else ["dense", "predictions"])
    for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(ckpt.variables), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["v2_softmax", "canonical"])
def test_convert_verify_runs_keras_at_the_models_size(saved, tmp_path, capsys, name):
    src = saved / f"{name}.{'h5' if name == 'v2_softmax' else 'keras'}"
    assert convert.main([str(src), str(tmp_path / "out.msgpack"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"keras (source) vs Flax (converted) outputs on a random batch (2, {SIZE}, {SIZE}, 3)" in out, out
    assert (tmp_path / "out.msgpack").exists()


def test_convert_verify_to_keras_compares_probabilities(saved, tmp_path, capsys):
    assert convert.main([str(saved / "v2_softmax.keras"), str(tmp_path / "out.keras"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "keras on the written out.keras vs Flax" in out and "FAILED" not in out, out


def test_unsupported_head_layer_is_named(saved, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(saved / "bn_head.keras"), str(tmp_path / "out.msgpack")])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "'head_bn' (BatchNormalization)", "in the head")
    assert not (tmp_path / "out.msgpack").exists()


def as_keras2(src, dst):
    """A copy of a Keras 3 legacy .h5 named as Keras 2 (TensorFlow) wrote it: weights under
    `<nested model>/<layer>/<var>:0`, depthwise kernels `depthwise_kernel`, inbound nodes as
    `[[[layer, node, tensor, kwargs]]]` and input shapes as `batch_input_shape`."""
    import json
    import shutil

    import h5py

    def keras2(model):
        for layer in model["config"]["layers"]:
            nodes = layer.get("inbound_nodes", [])
            names = [a["config"]["keras_history"][0] for node in nodes for a in node["args"] if isinstance(a, dict)]
            layer["inbound_nodes"] = [[[n, 0, 0, {}] for n in names]] if names else []
            if "batch_shape" in layer["config"]:
                layer["config"]["batch_input_shape"] = layer["config"].pop("batch_shape")
            if "layers" in layer["config"]:
                keras2(layer)

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        keras2(config)
        f.attrs["model_config"] = json.dumps(config)
        g = f["model_weights"]
        for top in g.attrs["layer_names"]:
            group, renamed = g[top], []
            for name in group.attrs["weight_names"]:
                name = name.decode() if isinstance(name, bytes) else name
                layer, leaf = name.split("/")[-2:]
                if leaf == "kernel" and ("depthwise" in layer or "conv_dw" in layer):
                    leaf = "depthwise_kernel"
                new = f"{top}/{layer}/{leaf}:0" if top != layer else f"{layer}/{leaf}:0"
                group.require_group(new.rsplit("/", 1)[0])
                group.move(name, new)
                renamed.append(new.encode())
            group.attrs["weight_names"] = renamed


@pytest.mark.parametrize("name", ["v2_softmax", "v1_softmax"])
def test_keras2_legacy_h5_is_read(saved, tmp_path, name, record_property):
    as_keras2(saved / f"{name}.h5", tmp_path / "k2.h5")
    ckpt = parity.load(tmp_path / "k2.h5")
    assert ckpt.architecture == parity.load(saved / f"{name}.keras").architecture
    x, reference = outputs(saved, name)
    error = relative_l2(ckpt.outputs(x), reference)
    record_property("relative_l2", error)
    assert error <= TOLERANCE
