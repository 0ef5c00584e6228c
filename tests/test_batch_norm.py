"""BatchNorm's training-mode VJP (flax_mobilenet.layers.batch_norm_train, written out so that XLA
keeps only the input and the output between the passes) against autodiff of the same formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mobilenet import backend, native
from flax_mobilenet.layers import ACTIVATIONS, BatchNorm, batch_norm_train


def _autodiff(x, scale, bias, epsilon, activation, dtype):
    """The forward pass of batch_norm_train, differentiated by JAX."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean((0, 1, 2))
    var = jnp.square(x32 - mean).mean((0, 1, 2))
    y = ((x32 - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias).astype(dtype)
    return (ACTIVATIONS[activation](y) if activation else y), mean, var


def _operands(dtype, shape=(3, 5, 7, 6)):
    keys = jax.random.split(jax.random.key(0), 6)
    # Values on both sides of 0 and 6 after normalisation, so that relu6 masks at both ends.
    x = (jax.random.normal(keys[0], shape) * 3 + 1).astype(dtype)
    scale = jax.random.uniform(keys[1], shape[-1:], minval=0.5, maxval=4.0).astype(jnp.promote_types(dtype, jnp.float32))
    bias = jax.random.normal(keys[2], shape[-1:]).astype(scale.dtype) + 2
    cotangents = (jax.random.normal(keys[3], shape).astype(dtype), jax.random.normal(keys[4], shape[-1:]).astype(scale.dtype), jax.random.normal(keys[5], shape[-1:]).astype(scale.dtype))
    return x, scale, bias, cotangents


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


# float64: the written-out VJP is the textbook BatchNorm backward, algebraically autodiff's; the
# two differ by float64 rounding over sums of ~100 terms (~1e-15 relative), so 1e-12. The same
# bound holds for the forward with the native statistics (the same sums in another order); with
# XLA's they are the same expressions, so equal. The cotangents of the batch mean and variance
# (outputs for the running statistics) are non-zero here, so that their terms are checked too.
@pytest.mark.parametrize("reductions", ["native", "xla"])
@pytest.mark.parametrize("activation", [None, "relu6", "relu"])
def test_vjp_equals_autodiff_in_float64(activation, reductions, monkeypatch):
    # The statistics and the backward's two sums in the native kernels (one read) or XLA's.
    monkeypatch.setenv(backend.BATCH_NORM_ENV, reductions)
    with jax.enable_x64(True):
        if reductions == "native":
            assert native.available()
        x, scale, bias, cotangents = _operands(jnp.float64)
        args = (1e-5, activation, jnp.dtype(jnp.float64))
        forward = lambda x, s, b: batch_norm_train(x, s, b, *args)
        assert ("flax_mobilenet_" in str(jax.make_jaxpr(forward)(x, scale, bias))) == (reductions == "native")
        got_out, got_vjp = jax.vjp(forward, x, scale, bias)
        want_out, want_vjp = jax.vjp(lambda x, s, b: _autodiff(x, s, b, *args), x, scale, bias)
        if activation == "relu6":
            y = want_out[0]
            assert jnp.any(y == 0) and jnp.any(y == 6) and jnp.any((y > 0) & (y < 6))
        for got, want in zip(got_out, want_out):
            assert _rel(got, want) <= (1e-12 if reductions == "native" else 0)
        backward = jax.jit(got_vjp)
        assert ("flax_mobilenet_" in str(jax.make_jaxpr(backward)(cotangents))) == (reductions == "native")
        for got, want in zip(backward(cotangents), want_vjp(cotangents)):
            assert got.dtype == want.dtype
            assert _rel(got, want) < 1e-12


# Second derivatives (grad of a function of the gradient) go through the statistics and the
# backward's sums: with the native kernels their tangents are XLA's (custom_jvp), so the result is
# autodiff's to float64 rounding, as above (1e-12). Without those rules this raised (no
# derivative of the custom call).
@pytest.mark.parametrize("reductions", ["native", "xla"])
def test_second_derivatives_equal_autodiff_in_float64(reductions, monkeypatch):
    monkeypatch.setenv(backend.BATCH_NORM_ENV, reductions)
    with jax.enable_x64(True):
        x, scale, bias, (g, _, _) = _operands(jnp.float64)
        args = (1e-5, "relu6", jnp.dtype(jnp.float64))

        def gradient_norm(bn):
            loss = lambda x, s, b: jnp.sum(bn(x, s, b, *args)[0] * g)
            return lambda x, s, b: sum(jnp.sum(d**2) for d in jax.grad(loss, (0, 1, 2))(x, s, b))

        got = jax.jit(jax.grad(gradient_norm(batch_norm_train), (0, 1, 2)))
        assert ("flax_mobilenet_" in str(jax.make_jaxpr(got)(x, scale, bias))) == (reductions == "native")
        want = jax.grad(gradient_norm(_autodiff), (0, 1, 2))(x, scale, bias)
        for a, b in zip(got(x, scale, bias), want):
            assert _rel(a, b) < 1e-12


# bf16 activations with float32 statistics (train.main --precision bf16): the output is rounded
# to bf16 (8 bits) in both, so the gradients agree to bf16 rounding of the input gradient:
# 2^-8 relative per element; 1e-2 on the whole tensor.
def test_vjp_in_bfloat16_matches_autodiff_to_bfloat16_rounding():
    x, scale, bias, cotangents = _operands(jnp.bfloat16)
    args = (1e-5, "relu6", jnp.dtype(jnp.bfloat16))
    got_out, got_vjp = jax.vjp(lambda x, s, b: batch_norm_train(x, s, b, *args), x, scale, bias)
    want_out, want_vjp = jax.vjp(lambda x, s, b: _autodiff(x, s, b, *args), x, scale, bias)
    assert got_out[0].dtype == jnp.bfloat16 and got_out[1].dtype == jnp.float32
    for got, want in zip(got_vjp(cotangents), want_vjp(cotangents)):
        assert got.dtype == want.dtype
        assert _rel(got, want) < 1e-2


def test_the_module_applies_its_activation_in_both_modes_and_updates_running_statistics():
    layer = BatchNorm(activation="relu6")
    x = jax.random.normal(jax.random.key(1), (4, 3, 3, 5)) * 8
    variables = layer.init(jax.random.key(0), x, train=False)
    y, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, jax.nn.relu6((x - x.mean((0, 1, 2))) / jnp.sqrt(x.var((0, 1, 2)) + 1e-5)), rtol=1e-5, atol=1e-6)
    assert float(y.min()) == 0
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x.mean((0, 1, 2)), rtol=1e-6)
    y_eval = layer.apply(variables, x, train=False)  # initial statistics: mean 0, variance 1
    np.testing.assert_allclose(y_eval, jax.nn.relu6(x / np.sqrt(1 + 1e-5)), rtol=1e-6)
    assert float(y_eval.min()) == 0 and float(y_eval.max()) == 6


def test_the_reductions_are_native_on_the_cpu_unless_overridden(monkeypatch):
    monkeypatch.delenv(backend.BATCH_NORM_ENV, raising=False)
    assert backend.batch_norm_reductions() == "native" and backend.batch_norm_reductions("gpu") == "xla"
    monkeypatch.setenv(backend.BATCH_NORM_ENV, "xla")
    assert backend.batch_norm_reductions() == "xla"
    monkeypatch.setenv(backend.BATCH_NORM_ENV, "cudnn")
    with pytest.raises(ValueError, match="^FLAX_MOBILENET_BATCHNORM='cudnn': expected one of auto, native, xla$"):
        backend.batch_norm_reductions()
