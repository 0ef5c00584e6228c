"""The Flax models' own contract: shapes at any input size, dtypes, intermediates, initialisation.

Shapes and dtypes come from `jax.eval_shape` (nothing is computed); parity with PyTorch is in
test_parity_outputs.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_mobilenet


def eval_shapes(model, resolution: int, batch: int = 2):
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x[:1], train=False), x)
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, x)
    return variables, out, state["intermediates"]


@pytest.mark.parametrize("arch", ["v1", "v2"])
@pytest.mark.parametrize("resolution", [32, 97, 224])
def test_any_input_size_gives_logits_per_image(arch, resolution):
    _, out, _ = eval_shapes(flax_mobilenet.create_model(arch, 0.5, num_classes=10), resolution)
    assert out.shape == (2, 10)


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_parameters_and_logits():
    variables, out, intermediates = eval_shapes(flax_mobilenet.MobileNetV2(width_mult=0.35, dtype=jnp.bfloat16), 64)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert intermediates["features_3"]["output"][0].dtype == jnp.bfloat16
    assert out.dtype == jnp.float32


def test_every_block_sows_its_output():
    model = flax_mobilenet.MobileNetV2(width_mult=1.0)
    _, _, intermediates = eval_shapes(model, 224)
    for block in model.architecture.blocks:
        assert intermediates[block.name]["output"][0].shape[-1] == block.out_channels


def test_initialisation_follows_torchvision():
    model = flax_mobilenet.MobileNetV1(width_mult=1.0)
    variables = flax_mobilenet.init_variables(model, jax.random.key(0), resolution=32)
    params = variables["params"]
    # kaiming_normal_(mode="fan_out"): std sqrt(2 / (out_channels * k * k)). A pointwise kernel of
    # 1024x1024 has 1M samples: its sample std is within 1% of that (sampling error ~0.07%).
    kernel = np.asarray(params["features_13"]["pointwise"]["conv"]["kernel"])
    assert np.std(kernel) == pytest.approx(np.sqrt(2 / 1024), rel=1e-2)
    depthwise = np.asarray(params["features_13"]["depthwise"]["conv"]["kernel"])  # (3, 3, 1, 1024)
    assert np.std(depthwise) == pytest.approx(np.sqrt(2 / (1024 * 9)), rel=5e-2)  # 9216 samples: ~0.7%
    classifier = params["classifier"]
    assert np.std(classifier["kernel"]) == pytest.approx(0.01, rel=1e-2)  # N(0, 0.01), 1M samples
    assert not np.any(classifier["bias"])
    bn = params["features_13"]["pointwise"]["bn"]
    stats = variables["batch_stats"]["features_13"]["pointwise"]["bn"]
    assert np.all(bn["scale"] == 1) and not np.any(bn["bias"])
    assert not np.any(stats["mean"]) and np.all(stats["var"] == 1)


@pytest.mark.parametrize("padding", ["same", ((0, 1), (0, 1))])
def test_padding_and_epsilon_change_no_variable(padding):
    # They change how the layers compute, not what they hold: checkpoints load either way.
    symmetric, _, _ = eval_shapes(flax_mobilenet.create_model("v1", 0.25, num_classes=10), 65)
    model = flax_mobilenet.create_model("v1", 0.25, num_classes=10, padding=padding, bn_epsilon=1e-3)
    variables, out, _ = eval_shapes(model, 65)
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, symmetric)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("resolution, last", [(64, 2), (67, 3)])
def test_same_padding_gives_tensorflows_sizes(resolution, last):
    # ceil(n / 2) at each of the five stride-2 layers: 64 -> 2, 67 -> 34, 17, 9, 5, 3.
    model = flax_mobilenet.MobileNetV2(num_classes=10, width_mult=0.35, padding="same")
    _, _, intermediates = eval_shapes(model, resolution)
    assert intermediates[model.architecture.blocks[-1].name]["output"][0].shape[1:3] == (last, last)


def test_depth_multiplied_v2_has_a_block_per_repeat():
    model = flax_mobilenet.MobileNetV2(num_classes=10, width_mult=0.5, depth_mult=1.4, fix_stem_head=True)
    variables, _, _ = eval_shapes(model, 32)
    blocks = [name for name in variables["params"] if name.startswith("features_")]
    assert len(blocks) == 1 + 26 + 1  # stem, 1+3+5+6+5+5+1, head
