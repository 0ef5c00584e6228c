"""The native CPU kernels (flax_mobilenet.native): float64 exactness, determinism, the dtypes they
take, and what happens where they cannot be built. Their float32 agreement with XLA's
convolution is in test_depthwise.py, beside the shifted form's."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mobilenet import depthwise, native
from flax_mobilenet.native import library
from flax_mobilenet.depthwise import native_depthwise_conv2d, xla_depthwise_conv2d


@pytest.fixture(autouse=True)
def _built():
    assert native.available(), "the native kernels did not build on this machine (see the warning)"


def _operands(shape, k, stride, padding, dtype=jnp.float32):
    kx, kk, kg = jax.random.split(jax.random.key(sum(shape) + k), 3)
    x = jax.random.normal(kx, shape, dtype)
    kernel = jax.random.normal(kk, (k, k, 1, shape[-1]), dtype)
    out = jax.eval_shape(lambda: xla_depthwise_conv2d(x, kernel, stride, padding))
    return x, kernel, jax.random.normal(kg, out.shape, dtype)


def _value_and_grads(fn, x, kernel, g, stride, padding):
    y, vjp = jax.vjp(lambda x, k: fn(x, k, stride, padding), x, kernel)
    return (y, *vjp(g))


# float64: the same products as XLA's convolution summed in another order, so the difference is
# float64 rounding (~1e-16 relative per sum); 1e-12 leaves room for sums of a few hundred terms
# while any indexing mistake would show at order 1.
# 21 channels run the per-pixel forward, 24 (3 vectors of float64) the row-register one.
@pytest.mark.parametrize("channels", [21, 24])
@pytest.mark.parametrize("stride", [1, 2])
def test_float64_forward_and_gradients_equal_xla_conv(stride, channels):
    with jax.enable_x64(True):
        x, kernel, g = _operands((2, 13, 10, channels), 3, stride, 1, jnp.float64)
        got = _value_and_grads(jax.jit(native_depthwise_conv2d, static_argnums=(2, 3)), x, kernel, g, stride, 1)
        want = _value_and_grads(xla_depthwise_conv2d, x, kernel, g, stride, 1)
        assert "flax_mobilenet_" in str(jax.make_jaxpr(native_depthwise_conv2d, static_argnums=(2, 3))(x, kernel, stride, 1))
        for a, b in zip(got, want):
            assert a.dtype == jnp.float64
            assert np.linalg.norm(np.asarray(a - b)) / np.linalg.norm(np.asarray(b)) < 1e-12


# The forward with eval-mode BatchNorm and its activation applied as it writes (the inference
# path of every depthwise layer): the same sums, then the same multiply-add, so float64 rounding
# only (1e-12, as above); values on both sides of 0 and 6, so that each activation clips.
@pytest.mark.parametrize("channels", [21, 24])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("stride", [1, 2])
def test_forward_with_batch_norm_and_activation_equals_the_composition_in_float64(stride, activation, channels):
    from flax_mobilenet.portable import ACTIVATIONS

    with jax.enable_x64(True):
        x, kernel, _ = _operands((2, 13, 10, channels), 3, stride, 1, jnp.float64)
        mul = jnp.linspace(0.5, 3.0, channels, dtype=jnp.float64)
        add = jnp.linspace(-2.0, 6.0, channels, dtype=jnp.float64)
        got = jax.jit(lambda x: depthwise.depthwise_conv2d_affine(x, kernel, stride, 1, mul, add, activation))(x)
        want = xla_depthwise_conv2d(x, kernel, stride, 1) * mul + add
        want = ACTIVATIONS[activation](want) if activation else want
        if activation == "relu6":
            assert jnp.any(want == 0) and jnp.any(want == 6)
        assert np.linalg.norm(np.asarray(got - want)) / np.linalg.norm(np.asarray(want)) < 1e-12


def test_the_fused_forward_refuses_an_activation_it_does_not_have():
    x, kernel, _ = _operands((1, 6, 6, 4), 3, 1, 1)
    ones = jnp.ones((4,))
    with pytest.raises(ValueError, match=r"^activation 'gelu': expected one of \[None, 'relu', 'relu6'\]$"):
        native.forward_affine(x, kernel[:, :, 0], ones, ones, (6, 6), 1, 1, "gelu")


# The dense convolution (native.dense_conv: the stem's 3x3 over 3 channels, and 1x1 layers), with
# and without eval-mode BatchNorm and its activation, against XLA's convolution: float64 rounding
# only (1e-12, as above); float32 against float64 1e-6 (sums of up to 27 * 6 products in float32,
# ~1e-7 relative; measured 2e-7 on the models' shapes). The shapes take every tile of the kernel
# (16, 8 and 1 output channels; the pixels that fit in registers, 8 with AVX-512 or 6 with AVX2,
# and the remainder), padding on each side, a partly
# padded last row and column (stride 2 over an odd size), and the 1x1 layer's in-place patches.
DENSE_SHAPES = [((2, 13, 10, 3), 3, 2, 1, 25), ((1, 9, 7, 5), 3, 1, 1, 17), ((3, 6, 5, 12), 1, 1, 0, 40), ((2, 7, 7, 4), 5, 2, 2, 8)]


@pytest.mark.parametrize("shape,k,stride,padding,features", DENSE_SHAPES)
@pytest.mark.parametrize("activation", ["plain", None, "relu6"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_dense_convolution_equals_xla_conv(shape, k, stride, padding, features, activation, dtype):
    from flax_mobilenet.portable import with_affine

    with jax.enable_x64(True):
        kx, kw = jax.random.split(jax.random.key(sum(shape) + k + features))
        x = jax.random.normal(kx, shape, jnp.float64)
        w = jax.random.normal(kw, (k, k, shape[3], features), jnp.float64)
        mul = jnp.linspace(0.5, 3.0, features, dtype=jnp.float64)
        add = jnp.linspace(-2.0, 6.0, features, dtype=jnp.float64)
        want = jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if activation != "plain":
            want = with_affine(want, mul, add, activation)
        if activation == "relu6":
            assert jnp.any(want == 0) and jnp.any(want == 6)
        x, w, mul, add = (a.astype(dtype) for a in (x, w, mul, add))
        if activation == "plain":
            fn = jax.jit(lambda x, w: native.dense_conv(x, w, stride, padding))
        else:
            fn = jax.jit(lambda x, w: native.dense_conv_affine(x, w, mul, add, stride, padding, activation))
        assert "flax_mobilenet_denseconv" in fn.lower(x, w).compile().as_text(), "the native kernel did not run"
        got = np.asarray(fn(x, w), np.float64)
        bound = 1e-12 if dtype == jnp.float64 else 1e-6
        assert np.linalg.norm(got - np.asarray(want)) / np.linalg.norm(np.asarray(want)) < bound


def test_the_models_take_the_dense_kernel_where_it_pays_on_this_cpu():
    # The stem (k > 1: XLA would write its patches out) always; a 1x1 layer only with AVX-512's 32
    # registers (with AVX2's 16, XLA's dot ran them faster); nothing above DENSE_NATIVE_MAX weights.
    assert native.vector_registers() in (16, 32)
    assert native.dense_pays((3, 3, 3, 32))
    assert native.dense_pays((1, 1, 256, 256)) == (native.vector_registers() == 32)
    assert not native.dense_pays((1, 1, 512, 512)) and not native.dense_pays((3, 3, 512, 512))


def test_the_dense_convolution_refuses_an_activation_it_does_not_have():
    x, w, ones = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones((8,))
    with pytest.raises(ValueError, match=r"^activation 'gelu': expected one of \[None, 'relu', 'relu6'\]$"):
        native.dense_conv_affine(x, w, ones, ones, 1, 1, "gelu")


# The 1x1 convolution's kernel gradient, x^T g over the pixels (native.pixel_outer): float64 against
# numpy is rounding only (1e-12, as above); float32 against float64 1e-6 (the sums run in float32
# over chunks of 256 rows, then over 32 partials: measured 3e-7, XLA's dot 4.5e-7). The shapes
# take every tile of the kernel (16, 8 and 1 columns by as many rows as fit in registers, 8 with
# AVX-512 or 6 with AVX2, then 1) and its remainders.
@pytest.mark.parametrize("pixels,a,b", [(3000, 27, 32), (1000, 8, 24), (513, 5, 7), (7, 16, 96), (20000, 144, 24)])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_pointwise_kernel_gradient_equals_numpy(pixels, a, b, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        kx, kg = jax.random.split(jax.random.key(pixels + a + b))
        x, g = jax.random.normal(kx, (pixels, a), dtype), jax.random.normal(kg, (pixels, b), dtype)
        hlo = jax.jit(native.pixel_outer).lower(x, g).compile().as_text()
        assert "flax_mobilenet_pointwisekernelgrad" in hlo, "the native kernel did not run"
        got = np.asarray(jax.jit(native.pixel_outer)(x, g), np.float64)
        want = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
        bound = 1e-12 if dtype == jnp.float64 else 1e-6
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound


def test_pointwise_kernel_gradient_is_xla_dot_where_the_output_is_large():
    x, g = jnp.ones((64, 128)), jnp.ones((64, 64))  # 8,192 values > OUTER_NATIVE_MAX
    assert 128 * 64 > native.OUTER_NATIVE_MAX
    assert "flax_mobilenet_" not in jax.jit(native.pixel_outer).lower(x, g).compile().as_text()


def test_kernel_gradient_is_the_same_bits_on_every_run():
    # Rows are shared out to XLA's threads as they come free, but summed in partials fixed by the
    # shape (kernels.cc, kKernelGradPartials), so the result may not depend on the schedule.
    x, kernel, g = _operands((8, 40, 40, 48), 3, 1, 1)
    grad = jax.jit(lambda x, g: native.kernel_grad(x, g, 3, 1, 1))
    first = np.asarray(grad(x, g))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(grad(x, g)), first)


@pytest.mark.parametrize("dtypes", [(jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16), (jnp.float32, jnp.bfloat16)])
def test_other_dtypes_take_the_shifted_form(dtypes):
    x = jnp.ones((1, 6, 6, 4), dtypes[0])
    kernel = jnp.ones((3, 3, 1, 4), dtypes[1])
    assert not native.supports(x, kernel)
    text = str(jax.make_jaxpr(native_depthwise_conv2d, static_argnums=(2, 3))(x, kernel, 1, 1))
    assert "flax_mobilenet_" not in text and "custom_vjp_call" in text


def test_the_kernels_refuse_a_dtype_they_do_not_have():
    x = jnp.ones((1, 6, 6, 4), jnp.bfloat16)
    with pytest.raises(TypeError, match="one dtype among"):
        native.forward(x, jnp.ones((3, 3, 4), jnp.bfloat16), (6, 6), 1, 1)


def test_a_missing_compiler_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler .*no-such-c\+\+.* on PATH \(set CXX\)"):
        library._build()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_names_the_command_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails, printing nothing
    with pytest.raises(RuntimeError, match=r"^false -O3 .* failed: \(no output\)$"):
        library._build()
    assert list(tmp_path.iterdir()) == []


def test_the_build_is_cached_by_source_compiler_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    first = library._build()
    assert first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert library._build() == first and first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    monkeypatch.setenv("CXX", "g++")
    assert library._build() != first  # another compiler command: another library


def test_where_the_kernels_cannot_be_built_the_layer_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(library, "_registered", lambda: "no C++ compiler 'c++' on PATH (set CXX)")
    library._warn_once.cache_clear()
    x, kernel, _ = _operands((1, 6, 6, 4), 3, 1, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = str(jax.make_jaxpr(lambda x, k: depthwise.depthwise_conv2d(x, k, 1, 1))(x, kernel))
        jax.make_jaxpr(lambda x, k: depthwise.depthwise_conv2d(x, k, 1, 1))(x, kernel)
    assert "flax_mobilenet_" not in text and "custom_vjp_call" in text
    messages = [str(w.message) for w in caught]
    assert messages == ["flax_mobilenet: the native CPU kernels are not available (no C++ compiler 'c++' on PATH (set CXX)); using the pure-JAX forms"]
    library._warn_once.cache_clear()


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax_mobilenet.depthwise import native_depthwise_conv2d, xla_depthwise_conv2d
mesh = Mesh(np.asarray(jax.devices()), ("data",))
x = jax.random.normal(jax.random.key(0), (8, 12, 12, 24))
w = jax.random.normal(jax.random.key(1), (3, 3, 1, 24))
from flax_mobilenet.native import batch_norm_backward_sums, batch_norm_statistics
shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
# Images of different means per device, so that the variance's spread term counts.
x_spread = x + jnp.arange(8.0)[:, None, None, None]
statistics = jax.jit(batch_norm_statistics)
assert "all-gather" not in statistics.lower(shard(x_spread)).compile().as_text(), "BatchNorm's statistics gathered x"
for a, b in zip(statistics(shard(x_spread)), (np.mean(x_spread, (0, 1, 2)), np.var(x_spread, (0, 1, 2)))):
    assert np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b) < 1e-6
g = jax.random.normal(jax.random.key(2), x.shape)
mean, mul, bias = x.mean((0, 1, 2)), jnp.linspace(1.0, 4.0, 24), jnp.linspace(-1.0, 3.0, 24)
from flax_mobilenet.native import batch_norm_backward_input, batch_norm_normalise
normalise = jax.jit(lambda x: batch_norm_normalise(x, mean, mul, bias, "relu6"))
assert "all-gather" not in normalise.lower(shard(x)).compile().as_text(), "BatchNorm's normalisation gathered x"
y = np.asarray(normalise(shard(x)))
want = np.clip((np.asarray(x) - np.asarray(mean)) * np.asarray(mul) + np.asarray(bias), 0, 6)
assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-6
sums = jax.jit(lambda *a: batch_norm_backward_sums(*a, "relu6"))
hlo = sums.lower(shard(g), shard(x), mean, mul, bias).compile().as_text()
assert "all-gather" not in hlo, "BatchNorm's sums gathered their operands"
got = sums(shard(g), shard(x), mean, mul, bias)
kept = np.where((y > 0) & (y < 6), np.asarray(g), 0)
want = (kept.sum((0, 1, 2)), (kept * (np.asarray(x) - np.asarray(mean))).sum((0, 1, 2)))
for a, b in zip(got, want):
    assert np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b) < 1e-6
terms = jax.random.uniform(jax.random.key(5), (8, 24)).at[:3].set(jnp.stack([mean, mul, bias]))
backward_input = jax.jit(lambda g, x: batch_norm_backward_input(g, x, terms, "relu6"))
assert "all-gather" not in backward_input.lower(shard(g), shard(x)).compile().as_text(), "BatchNorm's input gradient gathered"
t, c = np.asarray(terms), np.asarray(x) - np.asarray(mean)
want = t[1] * (kept - t[4] - c * t[3] * t[5]) + (t[6] + t[7] * c)
assert np.linalg.norm(np.asarray(backward_input(shard(g), shard(x))) - want) / np.linalg.norm(want) < 1e-6
from flax_mobilenet.layers import pointwise_conv
pw = jax.random.normal(jax.random.key(3), (24, 16))
pw_step = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(pointwise_conv(x, w))), (0, 1)))
hlo = pw_step.lower(shard(x), pw).compile().as_text()
assert "all-gather" not in hlo and "flax_mobilenet_pointwisekernelgrad" in hlo, "the 1x1 kernel gradient gathered x"
got = pw_step(shard(x), pw)
want = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("nhwa,ab->nhwb", x, w))), (0, 1))(x, pw)
for a, b in zip(got, want):
    assert np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)) < 1e-6
from flax_mobilenet.depthwise import depthwise_conv2d_affine
mul, add = jnp.linspace(0.5, 2.0, 24), jnp.linspace(-1.0, 3.0, 24)
fused = jax.jit(lambda x, w: depthwise_conv2d_affine(x, w, 2, 1, mul, add, "relu6"))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
assert "all-gather" not in fused.lower(xs, w).compile().as_text(), "the fused forward gathered x"
want = jax.nn.relu6(xla_depthwise_conv2d(x, w, 2, 1) * mul + add)
assert np.linalg.norm(np.asarray(fused(xs, w)) - np.asarray(want)) / np.linalg.norm(np.asarray(want)) < 1e-6
from flax_mobilenet.native import dense_conv_affine
stem = jax.random.normal(jax.random.key(4), (3, 3, 24, 16))
dense = jax.jit(lambda x, w: dense_conv_affine(x, w, mul[:16], add[:16], 2, 1, "relu6"))
assert "all-gather" not in dense.lower(xs, stem).compile().as_text(), "the dense convolution gathered x"
want = jax.nn.relu6(jax.lax.conv_general_dilated(x, stem, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")) * mul[:16] + add[:16])
assert np.linalg.norm(np.asarray(dense(xs, stem)) - np.asarray(want)) / np.linalg.norm(np.asarray(want)) < 1e-6
for stride in (1, 2):
    loss = lambda f: lambda x, w: jnp.sum(f(x, w, stride, 1) ** 2)
    step = jax.jit(jax.value_and_grad(loss(native_depthwise_conv2d), (0, 1)))
    xs, ws = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P()))
    hlo = step.lower(xs, ws).compile().as_text()
    assert "all-gather" not in hlo, "an operand was gathered onto every device"
    got, want = step(xs, ws), jax.value_and_grad(loss(xla_depthwise_conv2d), (0, 1))(x, w)
    assert got[1][0].sharding.spec == P("data"), got[1][0].sharding
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)) < 1e-6
print("ok")
"""


def test_a_batch_sharded_over_devices_runs_the_kernels_per_device_without_gathering():
    # 4 CPU devices need a fresh process (the flag is read when JAX starts). Each device runs the
    # kernels on its own 2 images, the kernel gradient's and BatchNorm's partial sums are summed
    # over devices, and the results equal XLA's convolution and numpy's sums on the whole batch up
    # to float32 rounding (FP32 1e-6, as in test_depthwise.py).
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_jaxlib_older_than_tested_is_one_clear_error(monkeypatch):
    import jaxlib

    monkeypatch.setattr(jaxlib, "__version__", "0.4.35")
    with pytest.raises(RuntimeError, match=r"^jaxlib 0.4.35 is older than 0.10, the oldest tested$"):
        library._build()


def _batch_norm_operands(dtype, shape=(3, 9, 7, 85), seed=4):
    """x, a cotangent g, and per-channel mean, mul (= scale / std) and bias that put the
    pre-activation (x - mean) * mul + bias on both sides of 0 and of 6."""
    keys = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(keys[0], shape, dtype)
    channels = shape[-1]
    mean = x.mean((0, 1, 2)) + 0.1
    return x, jax.random.normal(keys[1], shape, dtype), mean, jnp.linspace(1.0, 6.0, channels, dtype=dtype), jnp.linspace(-1.0, 4.0, channels, dtype=dtype)


def _numpy_passes(pre, activation):
    return {None: np.ones(pre.shape, bool), "relu": pre > 0, "relu6": (pre > 0) & (pre < 6)}[activation]


# Training-mode BatchNorm's passes (layers.batch_norm_train on the CPU). float64: the same
# arithmetic as numpy's up to the multiply-add's single rounding and the sums' order: float64
# rounding, 1e-12 as above. The mask is recomputed from x, the same pre-activation as numpy's
# (a value within float64 rounding of 0 or 6 has probability ~1e-16 here).
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_batch_norm_passes_equal_numpy_in_float64(activation):
    with jax.enable_x64(True):
        x, g, mean, mul, bias = _batch_norm_operands(jnp.float64)
        xn, gn, mn, un, bn = (np.asarray(a) for a in (x, g, mean, mul, bias))
        pre = (xn - mn) * un + bn
        passes = _numpy_passes(pre, activation)
        y = jax.jit(native.batch_norm_normalise, static_argnums=4)(x, mean, mul, bias, activation)
        want_y = {None: pre, "relu": np.maximum(pre, 0), "relu6": np.clip(pre, 0, 6)}[activation]
        assert y.dtype == jnp.float64 and np.linalg.norm(np.asarray(y) - want_y) / np.linalg.norm(want_y) < 1e-12
        got = jax.jit(native.batch_norm_backward_sums, static_argnums=5)(g, x, mean, mul, bias, activation)
        kept = np.where(passes, gn, 0)
        want = (kept.sum((0, 1, 2)), (kept * (xn - mn)).sum((0, 1, 2)))
        for a, b in zip(got, want):
            assert a.dtype == jnp.float64
            assert np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b) < 1e-12
        terms = jax.random.normal(jax.random.key(9), (8, x.shape[-1]), jnp.float64).at[:3].set(jnp.stack([mean, mul, bias]))
        t = np.asarray(terms)
        dx = jax.jit(native.batch_norm_backward_input, static_argnums=3)(g, x, terms, activation)
        want = t[1] * (kept - t[4] - (xn - mn) * t[3] * t[5]) + (t[6] + t[7] * (xn - mn))
        assert np.linalg.norm(np.asarray(dx) - want) / np.linalg.norm(want) < 1e-12


def test_batch_norm_backward_sums_in_float32_are_close_to_float64_and_the_same_bits_on_every_run():
    # 12,544 rows: 32 blocks of runs of 64 rows, shared out to XLA's threads as they come free but
    # added in an order fixed by the shape. Each float32 run sums 64 terms, then the runs and
    # blocks add in double: float32 rounding of a 64-term sum, well under FP32 1e-6 (as in
    # test_depthwise.py) in relative L2. The mask is the one of the kernel's own output (the
    # normalisation's): the sums pass the gradient exactly where the forward's output is not
    # clipped, to the last bit of the pre-activation.
    x, g, mean, mul, bias = _batch_norm_operands(jnp.float32, (16, 28, 28, 40), seed=5)
    sums = jax.jit(native.batch_norm_backward_sums, static_argnums=5)
    first = [np.asarray(a) for a in sums(g, x, mean, mul, bias, "relu6")]
    for _ in range(5):
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, sums(g, x, mean, mul, bias, "relu6")))
    y = np.asarray(native.batch_norm_normalise(x, mean, mul, bias, "relu6"))
    xn, gn = (np.asarray(a, np.float64) for a in (x, g))
    kept = np.where((y > 0) & (y < 6), gn, 0)
    want = (kept.sum((0, 1, 2)), (kept * (xn - np.asarray(mean, np.float64))).sum((0, 1, 2)))
    for a, b in zip(first, want):
        assert a.dtype == np.float32
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-6


# float64: the same sums in another order (runs of 64 rows, each two-pass, merged in double):
# float64 rounding, 1e-12 as above. float32: each run's sums in float32 over 64 terms, then
# double: float32 rounding, well under FP32 1e-6; measured 4e-8 to 1e-7 in max relative error
# per channel, against XLA's two reductions' 1e-7 to 2e-7. A mean 1000 standard deviations from
# zero checks that the variance does not cancel (a one-pass sum of squares would lose it all in
# float32).
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("shape", [(3, 9, 7, 85), (16, 28, 28, 40), (1, 1, 1, 4)])
def test_batch_norm_statistics_equal_numpy(shape, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        x = jax.random.normal(jax.random.key(6), shape, dtype) * jnp.linspace(0.5, 2, shape[-1], dtype=dtype) + 1000
        statistics = jax.jit(native.batch_norm_statistics)
        got = statistics(x)
        assert all(np.array_equal(a, b) for a, b in zip(got, statistics(x)))  # fixed order: same bits
        xn = np.asarray(x, np.float64)
        want = (xn.mean((0, 1, 2)), xn.var((0, 1, 2)))
        bound = 1e-12 if dtype == jnp.float64 else 1e-6
        for a, b in zip(got, want):
            assert a.dtype == dtype and a.shape == shape[-1:]
            if shape[:3] == (1, 1, 1):
                assert np.array_equal(np.asarray(a, np.float64), b)  # one row: the row, variance 0
            else:
                assert np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)) < bound


def test_batch_norm_passes_refuse_mixed_dtypes_and_unknown_activations():
    x, c = jnp.ones((1, 2, 2, 3), jnp.bfloat16), jnp.zeros(3, jnp.float32)
    with pytest.raises(TypeError, match="one dtype among"):
        native.batch_norm_backward_sums(x, x, c, c, c, "relu6")
    x = x.astype(jnp.float32)
    with pytest.raises(ValueError, match=r"^activation 'gelu': expected one of \[None, 'relu', 'relu6'\]$"):
        native.batch_norm_normalise(x, c, c, c, "gelu")
