"""`flax_mobilenet.nnx`: the NNX models compute what the Linen models compute, from the same
variables, and train with NNX's own tools.

The weights are random (`random_variables`), BatchNorm's included, so that a BatchNorm read from
the wrong variable, or left at its identity initialisation, changes the logits. Small widths at
32x32 keep the compilations short; parameter shapes do not depend on the input size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import flax_mobilenet
from flax_mobilenet import nnx as mobilenet_nnx

RESOLUTION = 32
LINEN = {
    "v1": lambda: flax_mobilenet.MobileNetV1(num_classes=10, width_mult=0.25),
    # With its dropout (0.2 by default): the train-mode test compares the masks too.
    "v2": lambda: flax_mobilenet.MobileNetV2(num_classes=10, width_mult=0.35),
}
NNX = {"v1": mobilenet_nnx.MobileNetV1, "v2": mobilenet_nnx.MobileNetV2}
NNX_KWARGS = {"v1": dict(num_classes=10, width_mult=0.25), "v2": dict(num_classes=10, width_mult=0.35)}


def random_variables(linen: flax_mobilenet.MobileNet, seed: int = 0) -> dict:
    """Linen variables with every entry random: kernels He-scaled, BatchNorm far from identity."""
    shapes = jax.eval_shape(lambda key: flax_mobilenet.init_variables(linen, key, RESOLUTION), jax.random.key(0))
    rng = np.random.default_rng(seed)
    draw = {
        "kernel": lambda s: rng.normal(0, np.sqrt(2 / np.prod(s[:-1])), s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "var": lambda s: rng.uniform(0.5, 2.0, s),
        "bias": lambda s: rng.normal(0, 0.1, s),
        "mean": lambda s: rng.normal(0, 0.1, s),
    }
    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict(
        {path: jnp.asarray(draw[path[-1]](leaf.shape), leaf.dtype) for path, leaf in flat.items()}
    )


def images(batch: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, RESOLUTION, RESOLUTION, 3))


@nnx.jit
def nnx_logits(model, x, key):
    return model(x, rngs=key)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_eval_mode_gives_the_linen_logits(arch):
    linen = LINEN[arch]()
    variables = random_variables(linen)
    x = images(4)
    model = NNX[arch](**NNX_KWARGS[arch], variables=variables)
    model.eval()
    got = nnx_logits(model, x, None)
    want = jax.jit(lambda v, x: linen.apply(v, x, train=False))(variables, x)
    # Exact: the NNX model runs the Linen model's own `apply`, the same program on the same inputs.
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_train_mode_gives_the_linen_logits_and_batch_statistics(arch):
    linen = LINEN[arch]()
    variables = random_variables(linen)
    x = images(4)
    key = jax.random.key(2)  # the same dropout key for both: the same mask
    model = NNX[arch](**NNX_KWARGS[arch], variables=variables)  # a new model trains, as NNX's layers do
    got = nnx_logits(model, x, key)
    want, updates = jax.jit(
        lambda v, x: linen.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    )(variables, x)
    after = mobilenet_nnx.to_variables(model)
    # Exact, logits and running statistics: the same program on the same inputs (see above).
    np.testing.assert_array_equal(got, want)
    jax.tree.map(np.testing.assert_array_equal, after["batch_stats"], updates["batch_stats"])
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), after["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(moved)), "every running statistic moves towards the batch's"


def test_nnx_optimizer_lowers_the_loss_on_a_fixed_batch():
    model = mobilenet_nnx.MobileNetV1(**NNX_KWARGS["v1"], variables=random_variables(LINEN["v1"]()))
    # Random weights (BatchNorm far from its initialisation) make this loss steep: a step of 3e-5
    # descends smoothly, where 1e-4 already overshoots and the loss oscillates.
    optimizer = nnx.Optimizer(model, optax.sgd(3e-5), wrt=nnx.Param)
    x, labels = images(8), jnp.arange(8) % 10

    @nnx.jit
    def train_step(model, optimizer, x, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, labels)) for _ in range(5)]
    # Five steps of gradient descent on one batch of eight: the loss falls by over 40% (2.16 to
    # 1.24); asking for 10% leaves room for another CPU's rounding.
    assert losses[-1] < 0.9 * losses[0], losses


def test_variables_round_trip_exactly():
    variables = random_variables(LINEN["v2"]())
    model = mobilenet_nnx.MobileNetV2(**NNX_KWARGS["v2"], variables=variables)
    back = mobilenet_nnx.to_variables(model)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), back, variables)))


def test_parameters_sit_at_their_linen_paths():
    variables = random_variables(LINEN["v2"]())
    model = mobilenet_nnx.MobileNetV2(**NNX_KWARGS["v2"], variables=variables)
    kernel = model.features_1["depthwise"]["conv"]["kernel"]
    assert isinstance(kernel, nnx.Param)
    assert np.array_equal(kernel[...], variables["params"]["features_1"]["depthwise"]["conv"]["kernel"])
    assert isinstance(model.features_1["depthwise"]["bn"]["mean"], nnx.BatchStat)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_a_new_model_has_the_linen_variables_shapes(arch):
    # nnx.eval_shape: the initialisation is traced, not compiled.
    model = nnx.eval_shape(lambda: NNX[arch](**NNX_KWARGS[arch], rngs=nnx.Rngs(0)))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), mobilenet_nnx.to_variables(model))
    linen = LINEN[arch]()
    shapes = jax.eval_shape(lambda key: flax_mobilenet.init_variables(linen, key, RESOLUTION), jax.random.key(0))
    assert got == jax.tree.map(lambda a: (a.shape, a.dtype), shapes)


def test_variables_of_another_width_are_refused():
    variables = random_variables(flax_mobilenet.MobileNetV1(num_classes=10, width_mult=0.5))
    # The stem's 32 channels times 0.5, where 0.25 expects 8.
    with pytest.raises(ValueError, match=r"stem/bn/\w+ has shape \(16,\), expected \(8,\)"):
        mobilenet_nnx.MobileNetV1(**NNX_KWARGS["v1"], variables=variables)


def test_dropout_in_training_mode_without_rngs_is_refused():
    model = mobilenet_nnx.MobileNetV2(**NNX_KWARGS["v2"], variables=random_variables(LINEN["v2"]()))
    with pytest.raises(ValueError, match="needs a random stream"):
        model(images(2))  # refused before anything is computed


def test_batch_norm_and_dropout_in_different_modes_are_refused():
    model = mobilenet_nnx.MobileNetV1(**NNX_KWARGS["v1"], variables=random_variables(LINEN["v1"]()))
    with pytest.raises(ValueError, match="one mode"):
        nnx.view(model, deterministic=True)(images(2))
