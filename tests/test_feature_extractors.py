"""Feature extractors, as each library makes them: timm's num_classes=0, a torchvision state dict
without its classifier, transformers' base model, Keras's include_top=False with average pooling.
Read, each gives the pooled features its library gives (the Flax model with no classes returns
them), and written back to every layout and read again, the same variables."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

import parity
from parity.models import relative_l2
from parity.random_weights import randomize_batchnorm

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

# float32 rounding through ~50 layers: up to 1e-5 relative L2 (tests/test_layouts.py); features
# taken before or after the wrong layer, or a wrong layout, are off by far more.
TOLERANCE = 1e-5
X = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
NCHW = torch.from_numpy(np.ascontiguousarray(X.transpose(0, 3, 1, 2)))


def features(ckpt) -> np.ndarray:
    return np.asarray(ckpt.model.apply(ckpt.variables, X, train=False))


def timm_features():
    model = randomize_batchnorm(timm.create_model("mobilenetv2_050", num_classes=0), 0).eval()
    with torch.no_grad():
        return model, model(NCHW).numpy()


def torchvision_features():
    import torchvision

    model = randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.5), 1).eval()
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    with torch.no_grad():
        return backbone, torch.nn.functional.adaptive_avg_pool2d(model.features(NCHW), 1).flatten(1).numpy()


def transformers_features():
    model = randomize_batchnorm(transformers.MobileNetV2Model(transformers.MobileNetV2Config(depth_multiplier=0.35)), 2).eval()
    with torch.no_grad():
        return model, model(pixel_values=NCHW).pooler_output.numpy()


def transformers_v1_features():
    model = randomize_batchnorm(transformers.MobileNetV1Model(transformers.MobileNetV1Config(depth_multiplier=0.25)), 3).eval()
    with torch.no_grad():
        return model, model(pixel_values=NCHW).pooler_output.numpy()


def keras_features():
    model = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None, include_top=False, pooling="avg")
    return model, np.asarray(model(X, training=False))


SOURCES = {
    "timm": timm_features, "torchvision": torchvision_features, "transformers": transformers_features,
    "transformers_v1": transformers_v1_features, "keras": keras_features,
}


@pytest.mark.parametrize("library", SOURCES)
def test_a_feature_extractor_gives_its_librarys_pooled_features(library):
    source, expected = SOURCES[library]()
    ckpt = parity.load(source)
    assert ckpt.architecture.num_classes == 0
    assert relative_l2(features(ckpt), expected) < TOLERANCE


@pytest.mark.parametrize("library", ["torchvision", "keras"])
def test_a_feature_extractor_round_trips_through_every_layout_that_holds_it(library, tmp_path):
    from parity.layouts.registry import holders

    ckpt = parity.load(SOURCES[library]()[0])
    names = {"torchvision": "w.pth", "timm": "t.safetensors", "hf": "hf_dir", "keras": "w.keras", "flax": "w.msgpack"}
    written = holders(ckpt.architecture)
    # PyTorch's padding: hf (tf_padding off), timm, torchvision, flax; Keras's fixed stride-2 padding: keras, flax
    assert written == (["hf", "timm", "torchvision", "flax"] if library == "torchvision" else ["keras", "flax"]), written
    for layout in written:
        parity.save(ckpt, tmp_path / names[layout], layout=layout)
        back = parity.load(tmp_path / names[layout])
        assert back.architecture.num_classes == 0
        same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), back.variables, ckpt.variables)
        assert all(jax.tree.leaves(same)), layout
