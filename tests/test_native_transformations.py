"""The native CPU kernels under JAX's transformations: jit, vmap, forward mode, reverse mode and
higher derivatives give what the same transformation of XLA's forms gives (the kernels are JAX
primitives whose derivatives are the other kernels, flax_mobilenet.native), and jax.export
serializes XLA's forms in their place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_mobilenet import backend, create_model, depthwise, init_variables, native
from flax_mobilenet.depthwise import native_depthwise_conv2d, xla_depthwise_conv2d

# Everything here runs in float64: the native kernels sum the same products as XLA in another
# order, so the two differ by float64 rounding (~1e-16 relative per operation). 1e-12 leaves room
# for the sums of a few hundred terms and the chains of derivatives below, while a wrong
# derivative, transpose or batching rule shows at order 1.
FLOAT64 = 1e-12


@pytest.fixture(autouse=True)
def _float64():
    assert native.available(), "the native kernels did not build on this machine (see the warning)"
    with jax.enable_x64(True):
        yield


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _assert_close(got, want, bound=FLOAT64):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == jnp.float64
        assert _rel(a, b) < bound


def _operands():
    kx, kk = jax.random.split(jax.random.key(3))
    return jax.random.normal(kx, (2, 9, 8, 5), jnp.float64), jax.random.normal(kk, (3, 3, 1, 5), jnp.float64)


def _scalar(conv, stride):
    """A non-linear scalar of the layer's output, so that derivatives past the first are not zero."""
    return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, stride, 1)))


def _grad_norm(f):
    return lambda x, kernel: sum(jnp.sum(t**2) for t in jax.grad(f, (0, 1))(x, kernel))


# Each transformation of a function f(conv) of the layer, applied to (x, kernel).
TRANSFORMATIONS = {
    "jvp": lambda f: lambda x, k: jax.jvp(f, (x, k), (jnp.cos(x), -k))[1],
    "grad": lambda f: jax.grad(f, (0, 1)),
    "grad of grad": lambda f: jax.grad(_grad_norm(f), (0, 1)),
    "third derivative": lambda f: jax.grad(lambda x, k: jnp.sum(jax.grad(_grad_norm(f), 1)(x, k) ** 2), (0, 1)),
    "hessian (forward over reverse)": lambda f: jax.hessian(f, 1),
    "per-example gradients (vmap of grad)": lambda f: jax.vmap(jax.grad(lambda x, k: f(x[None], k), (0, 1)), (0, None)),
    "an ensemble of kernels (vmap over the kernel)": lambda f: jax.vmap(jax.grad(f, (0, 1)), (None, 0)),
}


# Eval-mode BatchNorm's multiply-add and ReLU6 after the layer, fused into the native forward
# (depthwise_conv2d_affine) or composed after XLA's convolution; values on both sides of 0 and 6.
MUL, ADD = np.linspace(0.5, 3.0, 5), np.linspace(-1.0, 5.0, 5)


def _with_batch_norm(x, kernel, stride, padding):
    return jax.nn.relu6(xla_depthwise_conv2d(x, kernel, stride, padding) * jnp.asarray(MUL) + jnp.asarray(ADD))


def _native_with_batch_norm(x, kernel, stride, padding):
    return depthwise.depthwise_conv2d_affine(x, kernel, stride, padding, jnp.asarray(MUL), jnp.asarray(ADD), "relu6")


# Each layer: (its native form, its XLA form, the primitive the native form runs).
LAYERS = {
    "depthwise": (native_depthwise_conv2d, xla_depthwise_conv2d, "flax_mobilenet_depthwise_forward"),
    "depthwise + eval BatchNorm + ReLU6": (_native_with_batch_norm, _with_batch_norm, "flax_mobilenet_depthwise_forward_affine"),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_each_transformation_of_the_native_layer_equals_the_same_of_xla_conv(name, stride, layer, monkeypatch):
    monkeypatch.setenv(backend.DEPTHWISE_ENV, "native")
    native_layer, xla_layer, _ = LAYERS[layer]
    x, kernel = _operands()
    if name.startswith("an ensemble"):
        kernel = jnp.stack([kernel, -kernel, 0.5 * kernel])
    transform = TRANSFORMATIONS[name]
    got = jax.jit(transform(_scalar(native_layer, stride)))(x, kernel)
    want = transform(_scalar(xla_layer, stride))(x, kernel)
    _assert_close(got, want)
    # The transformed function runs the kernels, not a fallback. (All of these differentiate: the
    # fused forward's derivatives are the unfused form's, so they run the plain forward.)
    assert "flax_mobilenet_depthwise_forward[" in str(jax.make_jaxpr(transform(_scalar(native_layer, stride)))(x, kernel))


# Where the map's axis goes: into the images when only the input is mapped, into the channels when
# the kernel is; in any position of the operand.
@pytest.mark.parametrize("in_axes", [(0, None), (2, None), (None, 0), (0, 0), (3, 1)])
def test_vmap_of_the_layer_equals_a_loop(in_axes):
    x, kernel = _operands()
    xs = jnp.stack([x, 2 * x, x + 1], axis=in_axes[0]) if in_axes[0] is not None else x
    ks = jnp.stack([kernel, -kernel, 0.5 * kernel], axis=in_axes[1]) if in_axes[1] is not None else kernel
    take = lambda a, axis, i: a if axis is None else jnp.take(a, i, axis)  # noqa: E731
    for native_layer, xla_layer, primitive in LAYERS.values():
        mapped = jax.vmap(lambda x, k: native_layer(x, k, 2, 1), in_axes)
        assert primitive + "[" in str(jax.make_jaxpr(mapped)(xs, ks))
        got = jax.jit(mapped)(xs, ks)
        want = jnp.stack([xla_layer(take(xs, in_axes[0], i), take(ks, in_axes[1], i), 2, 1) for i in range(3)])
        _assert_close(got, want)


# The 1x1 convolution (layers.pointwise_conv, whose kernel gradient is native.pixel_outer) under
# the same transformations, against the same of the plain channel contraction.
@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_each_transformation_of_the_1x1_convolution_equals_the_same_of_a_plain_contraction(name):
    from flax_mobilenet.layers import pointwise_conv

    x, _ = _operands()
    kernel = jax.random.normal(jax.random.key(5), (5, 6), jnp.float64)
    if name.startswith("an ensemble"):
        kernel = jnp.stack([kernel, -kernel, 0.5 * kernel])
    contraction = lambda x, k: jnp.sum(jnp.sin(jnp.einsum("nhwa,ab->nhwb", x, k)))  # noqa: E731
    transform = TRANSFORMATIONS[name]
    got = jax.jit(transform(lambda x, k: jnp.sum(jnp.sin(pointwise_conv(x, k)))))(x, kernel)
    _assert_close(got, transform(contraction)(x, kernel))


# The dense convolution (the stem's in eval mode, and 1x1 layers') under the same transformations,
# with eval-mode BatchNorm and ReLU6 fused (their derivatives are the unfused form's: the plain
# dense kernel for the stem, the 1x1 product's primitive for a 1x1 layer) and without.
DENSE = {"stem (3x3, stride 2)": (3, 2, 1), "1x1": (1, 1, 0)}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", DENSE)
@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_each_transformation_of_the_dense_convolution_equals_the_same_of_xla_conv(name, shape, fused):
    k, stride, padding = DENSE[shape]
    x, _ = _operands()
    kernel = jax.random.normal(jax.random.key(6), (k, k, 5, 6), jnp.float64)
    if name.startswith("an ensemble"):
        kernel = jnp.stack([kernel, -kernel, 0.5 * kernel])
    mul, add = jnp.linspace(0.5, 3.0, 6), jnp.linspace(-1.0, 5.0, 6)

    def conv(x, w, _stride, _padding):
        return native.dense_conv_affine(x, w, mul, add, stride, padding, "relu6") if fused else native.dense_conv(x, w, stride, padding)

    def reference(x, w, _stride, _padding):
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu6(y * mul + add) if fused else y

    transform = TRANSFORMATIONS[name]
    _assert_close(jax.jit(transform(_scalar(conv, stride)))(x, kernel), transform(_scalar(reference, stride))(x, kernel))
    # The dense forward, or (differentiated, fused) the primitive its derivatives run, is in the
    # function; a map over the kernel is XLA's batched convolution by design (`_vmap_rule`).
    if not name.startswith("an ensemble"):
        text = str(jax.make_jaxpr(transform(_scalar(conv, stride)))(x, kernel))
        assert ("flax_mobilenet_channel_product" if k == 1 and fused else "flax_mobilenet_dense_conv") in text


def test_vmap_of_batch_norm_passes_equals_numpy_per_element():
    keys = jax.random.split(jax.random.key(4), 2)
    x = jax.random.normal(keys[0], (3, 2, 6, 5, 7), jnp.float64) * 2 + 1
    g = jax.random.normal(keys[1], x.shape, jnp.float64)
    mean, var = jax.jit(jax.vmap(native.batch_norm_statistics))(x)
    _assert_close((mean, var), (x.mean((1, 2, 3)), x.var((1, 2, 3))))
    mul, bias = jnp.linspace(1.0, 3.0, 7), jnp.linspace(-1.0, 4.0, 7)
    # The mean shared by the mapped elements (unmapped), and mapped.
    for mean_axis, m in [(None, mean[0]), (0, mean)]:
        centred = np.asarray(x) - (np.asarray(m) if mean_axis is None else np.asarray(m)[:, None, None, None])
        pre = centred * np.asarray(mul) + np.asarray(bias)
        y = jax.jit(jax.vmap(lambda x, m: native.batch_norm_normalise(x, m, mul, bias, "relu6"), (0, mean_axis)))(x, m)
        _assert_close(y, np.clip(pre, 0, 6))
        sums = jax.jit(jax.vmap(lambda g, x, m: native.batch_norm_backward_sums(g, x, m, mul, bias, "relu6"), (0, 0, mean_axis)))(g, x, m)
        kept = np.where((pre > 0) & (pre < 6), np.asarray(g), 0)
        _assert_close(sums, (kept.sum((1, 2, 3)), (kept * centred).sum((1, 2, 3))))
        # The input gradient's terms (8, C): mean, mul, bias, then rstd and the four sums' terms.
        lead = m.shape[:-1]
        rest = jnp.linspace(0.5, 2.0, 5)[:, None] * jnp.ones(7)
        terms = jnp.concatenate([m[..., None, :], jnp.broadcast_to(jnp.stack([mul, bias]), (*lead, 2, 7)), jnp.broadcast_to(rest, (*lead, 5, 7))], -2)
        dx = jax.jit(jax.vmap(lambda g, x, t: native.batch_norm_backward_input(g, x, t, "relu6"), (0, 0, mean_axis)))(g, x, terms)
        t = np.asarray(terms) if lead else np.asarray(terms)[None]
        col = lambda i: t[:, i, None, None, None, :]  # noqa: E731
        _assert_close(dx, col(1) * (kept - col(4) - centred * col(3) * col(5)) + (col(6) + col(7) * centred))


# The whole model, MobileNetV2 (width 0.25, 32 px, 10 classes) in float64: the transformations
# users apply to a model, with the native kernels (the CPU's default) against XLA's forms.
# The Hessian-vector product through 52 training-mode BatchNorms is ill-conditioned: XLA's own
# forms differ from themselves by 1.9e-12 between eager and jitted evaluation, and move by 1.2e-11
# when the parameters are scaled by 1 + 1e-15 (measured). 1e-10 is above that rounding and far
# below a wrong rule's O(1); the first-order transformations measured 1e-16 to 1e-15.
MODEL_BOUND = 1e-10
def _model():
    model = create_model("v2", 0.25, 10, dtype=jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(model, jax.random.key(0), 32))
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float64)
    return model, variables, images


def _eval_logits(model):
    return lambda variables, images: model.apply(variables, images, train=False)


def _train_loss(model, batch_stats, images):
    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jnp.sin(logits))

    return loss


MODEL_TRANSFORMATIONS = {
    "an ensemble of parameters (vmap of eval)": lambda model, v, images: jax.vmap(_eval_logits(model), (0, None))(
        jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), v), images
    ),
    "per-example gradients in eval mode (vmap of grad)": lambda model, v, images: jax.vmap(
        jax.grad(lambda p, x: jnp.sum(jnp.sin(_eval_logits(model)({**v, "params": p}, x[None])))), (None, 0)
    )(v["params"], images),
    "forward mode in eval mode (jvp)": lambda model, v, images: jax.jvp(
        lambda p: _eval_logits(model)({**v, "params": p}, images), (v["params"],), (jax.tree.map(jnp.cos, v["params"]),)
    )[1],
    "hessian-vector product in train mode (grad of grad)": lambda model, v, images: jax.grad(
        lambda p: sum(jnp.vdot(a, jnp.cos(b)) for a, b in zip(jax.tree.leaves(jax.grad(_train_loss(model, v["batch_stats"], images))(p)), jax.tree.leaves(v["params"])))
    )(v["params"]),
}


@pytest.mark.parametrize("name", MODEL_TRANSFORMATIONS)
def test_model_transformations_with_the_native_kernels_equal_xla_forms(name, monkeypatch):
    model, variables, images = _model()
    transform = MODEL_TRANSFORMATIONS[name]
    for env in (backend.DEPTHWISE_ENV, backend.BATCH_NORM_ENV, backend.DENSE_ENV):
        monkeypatch.setenv(env, "native")
    jitted = jax.jit(lambda v, x: transform(model, v, x))
    assert "flax_mobilenet_depthwise" in str(jax.make_jaxpr(jitted)(variables, images))
    got = jitted(variables, images)
    for env in (backend.DEPTHWISE_ENV, backend.BATCH_NORM_ENV, backend.DENSE_ENV):
        monkeypatch.setenv(env, "xla")
    want = jax.jit(lambda v, x: transform(model, v, x))(variables, images)
    # One relative error over all the parameters' results: some are zero but for rounding (the
    # Hessian's rows for a BatchNorm bias that the next BatchNorm cancels: norm 1e-10 against
    # 1e7 for the whole product), so their own relative error would compare rounding with rounding.
    flat = lambda tree: jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])  # noqa: E731
    assert jax.tree.structure(got) == jax.tree.structure(want)
    _assert_close(flat(got), flat(want), MODEL_BOUND)


# jax.export serializes code to run elsewhere, where these kernels may not be built: the kernels
# are exported as XLA's own operations (no custom call left), and the exported functions compute
# what the native ones compute (MODEL_BOUND, for the same reason as above: 52 BatchNorms' VJPs).
def test_jax_export_serializes_xla_operations_that_compute_the_same():
    import re

    from jax import export

    model, variables, images = _model()
    logits = jax.jit(_eval_logits(model))
    grad = jax.jit(lambda p, x: jax.grad(_train_loss(model, variables["batch_stats"], x))(p))
    for fn, args in ((logits, (variables, images)), (grad, (variables["params"], images))):
        assert "flax_mobilenet_" in fn.lower(*args).as_text(), "the native kernels are not in the jitted function"
        exported = export.export(fn)(*args)
        assert re.findall(r"custom_call @(\w+)", exported.mlir_module()) == []
        flat = lambda tree: jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])  # noqa: E731
        _assert_close(flat(exported.call(*args)), flat(fn(*args)), MODEL_BOUND)
