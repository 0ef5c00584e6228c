"""The depthwise convolution: the shifted form and the native CPU kernels compute what XLA's grouped
convolution computes, forward and backward, and the implementation is chosen per backend unless
overridden."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from flax_mobilenet import create_model, depthwise, native
from flax_mobilenet.depthwise import native_depthwise_conv2d, shifted_depthwise_conv2d, xla_depthwise_conv2d
from parity import torch_to_flax

# (input NHWC, kernel size, stride, padding): odd and even sides, the models' 3x3 at strides 1
# and 2, a 5x5 and an unpadded case so that the index arithmetic is not tied to k=3, p=1.
CASES = [
    ((2, 9, 11, 5), 3, 1, 1),
    ((2, 9, 11, 5), 3, 2, 1),
    ((1, 8, 8, 3), 3, 2, 1),
    ((1, 11, 7, 4), 5, 2, 2),
    ((1, 7, 7, 3), 3, 1, 0),
    # 85 channels: the native kernels' channel blocks of 64, 16 and 1 all run; 3 x 12 output rows
    # are more than the kernel gradient's 32 partial sums, so some partials take 2 rows.
    ((3, 23, 12, 85), 3, 2, 1),
    # 3x3 layers with fewer than 64 channels, whole vectors of them: the native forward keeps the
    # taps in registers for a row (kernels.cc, RowTapsRow), with blocks of 2 and 1 vectors (48),
    # both strides, and no padding (whose rows have no clipped column).
    ((2, 9, 11, 48), 3, 1, 1),
    ((2, 10, 9, 32), 3, 2, 1),
    ((1, 7, 8, 16), 3, 1, 0),
]
IDS = [f"{'x'.join(map(str, s))}-k{k}-s{st}-p{p}" for s, k, st, p in CASES]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(shape, k, dtype=jnp.float32):
    kx, kk = jax.random.split(jax.random.key(sum(shape) + k))
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    kernel = jax.random.normal(kk, (k, k, 1, shape[-1]), jnp.float32).astype(dtype)
    return x, kernel


def _grads(fn, x, kernel, stride, padding):
    """Gradients of <fn(x, kernel), g> wrt x and kernel, for a fixed random cotangent g."""
    out = jax.eval_shape(lambda x, k: xla_depthwise_conv2d(x, k, stride, padding), x, kernel)
    g = jax.random.normal(jax.random.key(7), out.shape).astype(x.dtype)
    loss = lambda x, k: jnp.vdot(fn(x, k, stride, padding).astype(jnp.float32), g.astype(jnp.float32))  # noqa: E731
    return jax.jit(jax.grad(loss, (0, 1)))(x, kernel)


# fp32: both sum the same k*k products per output in a different order (and the kernel gradient
# the same N*H*W products), so they differ by rounding only: a few float32 ulps, well below 1e-6
# relative (measured 1e-7 to 3e-7).
FP32_RTOL = 1e-6


# Both forms of ours, each against XLA's grouped convolution.
FORMS = {"shifted": shifted_depthwise_conv2d, "native": native_depthwise_conv2d}


@pytest.fixture(params=list(FORMS))
def form(request):
    if request.param == "native":
        assert native.available(), "the native kernels did not build on this machine (see the warning)"
    return FORMS[request.param]


@pytest.mark.parametrize("shape,k,stride,padding", CASES, ids=IDS)
def test_forward_equals_xla_conv_fp32(form, shape, k, stride, padding):
    x, kernel = _inputs(shape, k)
    want = xla_depthwise_conv2d(x, kernel, stride, padding)
    got = jax.jit(form, static_argnums=(2, 3))(x, kernel, stride, padding)
    assert got.shape == want.shape
    assert rel_l2(got, want) < FP32_RTOL


@pytest.mark.parametrize("shape,k,stride,padding", CASES, ids=IDS)
def test_input_gradient_equals_xla_conv_fp32(form, shape, k, stride, padding):
    x, kernel = _inputs(shape, k)
    want = _grads(xla_depthwise_conv2d, x, kernel, stride, padding)[0]
    got = _grads(form, x, kernel, stride, padding)[0]
    assert rel_l2(got, want) < FP32_RTOL


@pytest.mark.parametrize("shape,k,stride,padding", CASES, ids=IDS)
def test_kernel_gradient_equals_xla_conv_fp32(form, shape, k, stride, padding):
    x, kernel = _inputs(shape, k)
    want = _grads(xla_depthwise_conv2d, x, kernel, stride, padding)[1]
    got = _grads(form, x, kernel, stride, padding)[1]
    assert rel_l2(got, want) < FP32_RTOL


# The kernel gradient sums over the batch in chunks of whole images (a cache-sized window per tap):
# a batch of 6 split into 6, 3 and 2 chunks, at both strides, must give the one-pass sum up to
# float32 rounding (the partial sums are added in another order).
@pytest.mark.parametrize("images_per_chunk", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_gradient_summed_in_chunks_of_the_batch_equals_xla_conv(images_per_chunk, stride, monkeypatch):
    shape, k, padding = (6, 9, 11, 5), 3, 1
    x, kernel = _inputs(shape, k)
    padded_image_bytes = (shape[1] + 2 * padding) * (shape[2] + 2 * padding) * shape[3] * 4
    monkeypatch.setattr(depthwise, "KERNEL_GRAD_CHUNK_BYTES", images_per_chunk * padded_image_bytes)
    xp = jnp.zeros((shape[0], shape[1] + 2 * padding, shape[2] + 2 * padding, shape[3]))
    assert depthwise._images_per_chunk(xp, depthwise.KERNEL_GRAD_CHUNK_BYTES) == images_per_chunk
    want = _grads(xla_depthwise_conv2d, x, kernel, stride, padding)[1]
    got = _grads(shifted_depthwise_conv2d, x, kernel, stride, padding)[1]
    assert rel_l2(got, want) < FP32_RTOL


def test_chunk_is_the_largest_divisor_of_the_batch_that_fits_and_at_least_one_image():
    xp = jnp.zeros((16, 10, 10, 4))  # 1,600 bytes per padded image
    assert depthwise._images_per_chunk(xp, 16 * 1600) == 16
    assert depthwise._images_per_chunk(xp, 7 * 1600) == 4
    assert depthwise._images_per_chunk(xp, 100) == 1
    assert depthwise._images_per_chunk(jnp.zeros((7, 10, 10, 4)), 6 * 1600) == 1


# bf16: the shifted form accumulates bf16 inputs in float32 and rounds each result once to bf16
# (8 significant bits: relative error at most 2^-9, about 0.2%). The reference is XLA's conv in
# float32 on the same bf16 values, so that rounding is all that should differ; 1e-2 is 5x it.
BF16_RTOL = 1e-2


@pytest.mark.parametrize("shape,k,stride,padding", CASES[:3], ids=IDS[:3])
def test_shifted_bf16_forward_and_gradients_match_fp32_conv(shape, k, stride, padding):
    x, kernel = _inputs(shape, k, jnp.bfloat16)
    x32, kernel32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    got = shifted_depthwise_conv2d(x, kernel, stride, padding)
    assert got.dtype == jnp.bfloat16
    assert rel_l2(got, xla_depthwise_conv2d(x32, kernel32, stride, padding)) < BF16_RTOL
    got_dx, got_dk = _grads(shifted_depthwise_conv2d, x, kernel, stride, padding)
    want_dx, want_dk = _grads(xla_depthwise_conv2d, x32, kernel32, stride, padding)
    assert got_dx.dtype == got_dk.dtype == jnp.bfloat16
    assert rel_l2(got_dx, want_dx) < BF16_RTOL
    assert rel_l2(got_dk, want_dk) < BF16_RTOL


def _primitives(fn, *args) -> set[str]:
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


def test_auto_picks_native_on_cpu_and_xla_elsewhere(monkeypatch):
    monkeypatch.delenv(depthwise.ENV_VAR, raising=False)
    assert jax.default_backend() == "cpu"
    assert depthwise.implementation() == "native"
    assert depthwise.implementation("gpu") == "xla"
    assert depthwise.implementation("tpu") == "xla"


def test_env_override_chooses_the_implementation_that_gets_traced(monkeypatch):
    x, kernel = _inputs((1, 5, 5, 2), 3)
    trace = lambda: _primitives(lambda x, k: depthwise.depthwise_conv2d(x, k, 1, 1), x, kernel)  # noqa: E731
    monkeypatch.setenv(depthwise.ENV_VAR, "xla")
    assert "conv_general_dilated" in trace()
    monkeypatch.setenv(depthwise.ENV_VAR, "shifted")
    assert "conv_general_dilated" not in trace()
    assert "custom_vjp_call" in trace()
    assert "flax_mobilenet_" not in _jaxpr_text(x, kernel)
    monkeypatch.setenv(depthwise.ENV_VAR, "native")
    assert "flax_mobilenet_" in _jaxpr_text(x, kernel)


def _jaxpr_text(x, kernel) -> str:
    """The traced depthwise layer, nested jaxprs (the custom VJP's body) included."""
    return str(jax.make_jaxpr(lambda x, k: depthwise.depthwise_conv2d(x, k, 1, 1))(x, kernel))


def test_env_override_rejects_an_unknown_implementation(monkeypatch):
    monkeypatch.setenv(depthwise.ENV_VAR, "pallas")
    with pytest.raises(ValueError, match="FLAX_MOBILENET_DEPTHWISE='pallas': expected one of auto, xla, shifted, native"):
        depthwise.implementation()


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_flax_model_with_shifted_depthwise_matches_torch_in_eval(arch, monkeypatch, record_property):
    # Width 0.25 and an odd input side (35: odd at every stride-2 layer) keep it small and
    # exercise the stride-2 layers' asymmetric last window.
    monkeypatch.setenv(depthwise.ENV_VAR, "shifted")
    torch.manual_seed(0)
    reference = torch_ref.create_model(arch, 0.25, num_classes=10).eval()
    # Non-trivial BatchNorm statistics, so that eval mode is not the identity normalisation.
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = np.random.default_rng(0).standard_normal((2, 35, 35, 3), dtype=np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    variables = torch_to_flax(reference.state_dict(), arch, 0.25)
    model = create_model(arch, 0.25, num_classes=10)
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images))
    error = rel_l2(got, want)
    record_property("logits_rel_l2", error)
    # The project's parity bar in float32: rel-L2 1e-5 on the logits.
    assert error < 1e-5


# The 1x1 convolution as one product over the flattened pixels (flax_mobilenet.layers.pointwise_conv,
# flattened so that XLA:CPU reads the cotangent in place for the kernel gradient) computes XLA's
# 1x1 convolution: the same products, summed in another order, so float32 rounding only
# (FP32_RTOL; BF16_RTOL in bfloat16), in its output, both gradients and its forward-mode tangent.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pointwise_conv_equals_xla_1x1_conv_forward_gradients_and_tangent(dtype):
    from flax_mobilenet.layers import pointwise_conv

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel[None, None], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    kx, kk, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 5, 7, 6)).astype(dtype)
    kernel = jax.random.normal(kk, (6, 4)).astype(dtype)
    g = jax.random.normal(kg, (2, 5, 7, 4)).astype(dtype)
    tolerance = FP32_RTOL if dtype == jnp.float32 else BF16_RTOL
    want_y, want_vjp = jax.vjp(conv, x, kernel)
    got_y, got_vjp = jax.vjp(jax.jit(pointwise_conv), x, kernel)
    assert got_y.dtype == dtype and rel_l2(got_y, want_y) < tolerance
    for got, want in zip(jax.jit(got_vjp)(g), want_vjp(g)):
        assert got.dtype == want.dtype == dtype
        assert rel_l2(got, want) < tolerance
    tangents = (x[..., ::-1], kernel * 2)
    assert rel_l2(jax.jvp(pointwise_conv, (x, kernel), tangents)[1], jax.jvp(conv, (x, kernel), tangents)[1]) < tolerance


# The dense k x k convolution (the stem) as patches times the kernel (flax_mobilenet.layers.PatchConv)
# computes XLA's convolution: the same k*k*C products per output, summed in another order, so
# float32 rounding only (FP32_RTOL), forward and both gradients; stored under the same "kernel".
@pytest.mark.parametrize("shape,k,stride,padding", CASES, ids=IDS)
def test_patch_conv_equals_xla_conv_forward_and_gradients(shape, k, stride, padding):
    from flax_mobilenet.layers import PatchConv

    layer = PatchConv(features=6, kernel_size=k, stride=stride, padding=padding)
    x = jax.random.normal(jax.random.key(sum(shape)), shape)
    variables = layer.init(jax.random.key(1), x)
    assert variables["params"]["kernel"].shape == (k, k, shape[-1], 6)

    def xla_conv(variables, x):
        pad = ((padding, padding), (padding, padding))
        return jax.lax.conv_general_dilated(x, variables["params"]["kernel"], (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    want_y, want_vjp = jax.vjp(xla_conv, variables, x)
    got_y, got_vjp = jax.vjp(jax.jit(layer.apply), variables, x)
    assert got_y.shape == want_y.shape and rel_l2(got_y, want_y) < FP32_RTOL
    g = jax.random.normal(jax.random.key(2), want_y.shape)
    (got_dv, got_dx), (want_dv, want_dx) = got_vjp(g), want_vjp(g)
    assert rel_l2(got_dv["params"]["kernel"], want_dv["params"]["kernel"]) < FP32_RTOL
    assert rel_l2(got_dx, want_dx) < FP32_RTOL
