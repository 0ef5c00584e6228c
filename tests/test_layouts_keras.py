"""parity.load against keras.applications itself (JAX backend; random weights and BatchNorm,
nothing downloaded), and Flax -> Keras files -> Flax bit-exact. Few tests: importing keras is slow."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported anywhere

import jax
import numpy as np
import pytest

import parity
from parity.models import relative_l2

keras = pytest.importorskip("keras")
# float32 rounding only (2e-6 measured); Keras's fixed ((0, 1), (0, 1)) padding read as SAME
# would be 0.2 off at odd sizes.
TOLERANCE = 1e-5


def randomised(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if type(layer).__name__ == "BatchNormalization":
            n = weights[0].shape[0]
            weights = [rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n), rng.uniform(-0.5, 0.5, n), rng.uniform(0.5, 2.0, n)]
        else:
            fan_out = np.prod(weights[0].shape[:2]) * (weights[0].shape[-1] if type(layer).__name__ != "DepthwiseConv2D" else 1)
            weights = [rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_out) if i == 0 else 0.1 * rng.standard_normal(w.shape) for i, w in enumerate(weights)]
        layer.set_weights([w.astype(np.float32) for w in weights])
    return model


@pytest.mark.parametrize("build, alpha, size", [("MobileNet", 0.3, 65), ("MobileNetV2", 0.35, 67)])
def test_keras_matches_and_round_trips_through_its_files(tmp_path, build, alpha, size):
    model = randomised(getattr(keras.applications, build)(weights=None, alpha=alpha, input_shape=(size, size, 3), classifier_activation=None))
    ckpt = parity.load(model)
    assert ckpt.layout == "keras" and ckpt.architecture.bn_epsilon == 1e-3
    x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
    got = np.asarray(ckpt.model.apply(ckpt.variables, x, train=False))
    assert relative_l2(got, np.asarray(model(x, training=False))) <= TOLERANCE
    model.save(tmp_path / "m.keras")
    from_file = parity.load(tmp_path / "m.keras")  # read with h5py, padding from its config
    assert from_file.architecture == ckpt.architecture
    if size % 2 == 0 or build == "MobileNet":
        parity.save(ckpt, tmp_path / "out.weights.h5")
        again = parity.load(tmp_path / "out.weights.h5")
        for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(ckpt.variables), strict=True):
            assert np.array_equal(a, b)


def test_symmetric_padding_cannot_be_written_as_keras(tmp_path):
    import torchvision

    ckpt = parity.load(torchvision.models.mobilenet_v2(width_mult=0.35).state_dict())
    with pytest.raises(parity.LayoutError, match="epsilon|symmetrically"):
        parity.save(ckpt, tmp_path / "w.weights.h5")
    assert not (tmp_path / "w.weights.h5").exists()
