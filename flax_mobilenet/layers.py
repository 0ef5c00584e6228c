"""Layers with PyTorch's semantics where they differ from Flax's defaults."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from flax_mobilenet import backend, native, portable
from flax_mobilenet.depthwise import depthwise_conv2d, depthwise_conv2d_affine
from flax_mobilenet.portable import ACTIVATIONS, with_affine

Dtype = Any

# torchvision initialises every convolution with kaiming_normal_(mode="fan_out"): an untruncated
# normal with variance 2 / (out_channels * kernel_h * kernel_w). For a depthwise kernel stored as
# (k, k, 1, C) Flax's fan_out is C * k * k, the same number PyTorch computes from (C, 1, k, k).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision: nn.init.normal_(linear.weight, 0, 0.01), zero bias.
classifier_init = nn.initializers.normal(stddev=0.01)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, epsilon: float, activation: str | None, dtype):
    """Training-mode BatchNorm over the batch and spatial axes, output in `dtype`, then
    `activation`: (activation(y), batch mean, biased batch variance).

    Statistics in float32 at least, the variance in two passes. The VJP is written out (the
    standard BatchNorm backward, as PyTorch's): autodiff would keep the centred input and the
    pre-activation as residuals, i.e. write two more activation-sized arrays per layer and read
    them back; this keeps only x and the output, and recomputes the rest inside the fused passes.
    Where `backend.batch_norm_reductions()` says native (float32 or float64 on the CPU), all four
    passes are native kernels (statistics, normalisation, the backward's sums and input gradient)
    and the backward recomputes the activation's mask from x with the forward's own expression, so
    it keeps and reads x alone: the output is not read back.
    """
    return _bn_fwd(x, scale, bias, epsilon, activation, dtype)[0]


def _bn_fwd(x, scale, bias, epsilon, activation, dtype):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var = (native.batch_norm_statistics if backend.native_batch_norm(x) else portable.batch_norm_statistics)(x32)
    # Centred before scaling: folded into x * mul + (bias - mean * mul), the gradient through the
    # batch mean subtracts two large sums, and measured 100x less accurate than PyTorch's against
    # float64 (1.6e-3 against 1.5e-5, V1 at 64 px, batch 16).
    rstd = jax.lax.rsqrt(var + epsilon)
    mul, shift = (scale * rstd).astype(mean.dtype), bias.astype(mean.dtype)
    if x.dtype == dtype and backend.native_batch_norm(x, mean, mul, shift):
        # The native passes keep x alone as the residual: the backward recomputes the activation's
        # mask from it (`native.batch_norm_normalise`), so y is neither kept for nor read by it.
        y = native.batch_norm_normalise(x, mean, mul, shift, activation)
        return (y, mean, var), (x, None, scale, shift, mean, rstd, mul)
    y = ((x32 - mean) * mul + shift).astype(dtype)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return (y, mean, var), (x, y, scale, shift, mean, rstd, mul)


def _bn_bwd(epsilon, activation, dtype, residuals, cotangents):
    x, y, scale, bias, mean, rstd, mul = residuals
    g, g_mean, g_var = cotangents
    count = x.size // x.shape[-1]
    if y is None:  # the native passes (see _bn_fwd)
        g_bias, g_centred = native.batch_norm_backward_sums(g, x, mean, mul, bias, activation)
        g_scale = g_centred * rstd
        terms = jnp.stack([mean, mul, bias, rstd, g_bias / count, g_scale / count, g_mean / count, g_var * (2.0 / count)])
        dx = native.batch_norm_backward_input(g, x, terms, activation)
        return dx, g_scale.astype(scale.dtype), g_bias.astype(scale.dtype)
    x32 = x.astype(mean.dtype)
    g32 = g.astype(mean.dtype)
    g_bias, g_centred = portable.backward_sums_from_output(g32, y, x32, mean, activation)
    g_scale = g_centred * rstd
    # The batch statistics are outputs too (for the running averages): their cotangents, zero in
    # training, are added for exactness.
    dx = portable.batch_norm_input_grad(portable.passed(g32, y, activation), x32 - mean, mul, rstd, g_bias / count,
                                        g_scale / count, g_mean / count, g_var * (2.0 / count))  # fmt: skip
    return dx.astype(x.dtype), g_scale.astype(scale.dtype), g_bias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` over the channel axis of NHWC input.

    Differs from `flax.linen.BatchNorm` in what PyTorch does: `momentum` is the weight of the new
    batch (0.1 in PyTorch's sense, 0.9 in Flax's); the running variance is updated with the
    unbiased batch variance (n / (n - 1)) while the batch is normalised with the biased one; the
    variance is computed in two passes in float32, not as E[x^2] - E[x]^2. Under `jax.jit` with a
    batch sharded over devices the means are over the global batch, as with SyncBatchNorm.

    `activation` (a key of ACTIVATIONS, or None) follows the normalisation, in the same module so
    that training's VJP covers both (`batch_norm_train`).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    activation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

        dtype = self.dtype or x.dtype
        if train:
            x, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.activation, jnp.dtype(dtype))
            if not self.is_initializing():
                n = x.size // channels
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
            return x

        mul, add = eval_affine(scale, bias, running_mean.value, running_var.value, self.epsilon)
        return with_affine(x.astype(dtype), mul.astype(dtype), add.astype(dtype), self.activation)

    def eval_affine(self) -> tuple[jax.Array, jax.Array]:
        """`eval_affine` of this module's variables (bound, after initialisation)."""
        params, stats = self.variables["params"], self.variables["batch_stats"]
        return eval_affine(params["scale"], params["bias"], stats["mean"], stats["var"], self.epsilon)


def eval_affine(scale, bias, mean, var, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Eval-mode BatchNorm as one multiply-add per channel, x * mul + add: the statistics are
    constants, so they fold into (mul, add)."""
    mul = scale * jax.lax.rsqrt(var + epsilon)
    return mul, bias - mean * mul


class DepthwiseConv(nn.Module):
    """A bias-free depthwise convolution, kernel stored as Flax's grouped `nn.Conv` stores it."""

    kernel_size: int
    stride: int
    padding: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, affine: tuple[jax.Array, jax.Array] | None = None, activation: str | None = None) -> jax.Array:
        """The convolution; with `affine` (eval-mode BatchNorm's (mul, add)), followed by it and
        `activation` in one pass where the native kernels run (`depthwise_conv2d_affine`)."""
        k, channels = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", conv_init, (k, k, 1, channels), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if affine is None:
            return depthwise_conv2d(x, kernel, self.stride, self.padding)
        mul, add = (a.astype(x.dtype) for a in affine)
        return depthwise_conv2d_affine(x, kernel, self.stride, self.padding, mul, add, activation)


class PointwiseConv(nn.Module):
    """A bias-free 1x1 convolution, stored as `nn.Conv` stores it ((1, 1, in, out) under "kernel"),
    computed as a matrix product over the channel axis.

    On the CPU, XLA lowers the 1x1 `conv_general_dilated` to a slower kernel than the dot, which
    lengthened the whole training step (`python -m bench`).
    """

    features: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, affine: tuple[jax.Array, jax.Array] | None = None, activation: str | None = None) -> jax.Array:
        """The convolution; with `affine` (eval-mode BatchNorm's (mul, add)), followed by it and
        `activation`, in one pass where the native dense kernel runs (`native.dense_conv_affine`)."""
        channels = x.shape[-1]
        kernel = self.param("kernel", conv_init, (1, 1, channels, self.features), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if affine is None:
            return pointwise_conv(x, kernel.reshape(channels, self.features))
        mul, add = (a.astype(x.dtype) for a in affine)
        if backend.native_dense(x, kernel, mul, add):
            return native.dense_conv_affine(x, kernel, mul, add, 1, 0, activation)
        return with_affine(pointwise_conv(x, kernel.reshape(channels, self.features)), mul, add, activation)


class PatchConv(nn.Module):
    """A bias-free k x k convolution (groups 1), stored as `nn.Conv` stores it: the stem.

    On the CPU, one matrix product of the patches, written out, with the kernel; in eval mode
    (`affine` given) the native dense kernel instead, where `backend.dense_convolutions()` says so,
    which sums each output pixel's k*k*C patch in registers and applies BatchNorm and the
    activation as it writes. For the stem (3 input channels) XLA:CPU's convolution runs far below
    the dot's speed, and writing the 27-channel patches and multiplying is faster; the native
    kernel, which writes no patches, faster still (`python -m bench`). Training keeps the patches:
    the kernel gradient reads them anyway, and the native forward did not shorten the training
    step. Lowered for any other platform (from any host: `backend.on_cpu`), XLA's convolution
    (cuDNN, the TPU's convolution unit).
    """

    features: int
    kernel_size: int
    stride: int
    padding: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, affine: tuple[jax.Array, jax.Array] | None = None, activation: str | None = None) -> jax.Array:
        """The convolution; with `affine` (eval-mode BatchNorm's (mul, add)), followed by it and
        `activation`, in one pass where the native dense kernel runs."""
        k, s, p, channels = self.kernel_size, self.stride, self.padding, x.shape[-1]
        kernel = self.param("kernel", conv_init, (k, k, channels, self.features), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        affine = None if affine is None else tuple(a.astype(x.dtype) for a in affine)
        if affine is not None and backend.native_dense(x, kernel, *affine):
            return native.dense_conv_affine(x, kernel, *affine, s, p, activation)
        y = backend.on_cpu(lambda x, kernel: pointwise_conv(portable.patches(x, k, s, p), kernel.reshape(k * k * channels, self.features)),
                           lambda x, kernel: portable.xla_conv2d(x, kernel, s, p), x, kernel)  # fmt: skip
        return y if affine is None else with_affine(y, *affine, activation)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., in) times kernel (in, out) over the channel axis, as one product over the flattened
    pixels (a free reshape of NHWC): `native.channel_product`.

    Flattened, the kernel gradient is x^T g over the pixels, reading both operands in their own
    layout. Contracted over N, H and W instead, it reached XLA:CPU in a form whose layout
    assignment transposed the cotangent into (out, pixels) before the product, fused into the
    producer (the BatchNorm backward) as a strided write, slow enough to dominate the first 1x1
    layer's step. Where that gradient has few values (the first layers), a native kernel sums it
    (`native.pixel_outer`).
    """
    return native.channel_product(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
