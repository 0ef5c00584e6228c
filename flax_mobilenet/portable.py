"""The pure-JAX forms: what the native kernels compute, in XLA's own operations.

They run wherever the kernels do not (another backend, another dtype, a machine without a C++
compiler), they are what `jax.export` serializes in the kernels' place, and their derivatives are
the tangents of BatchNorm's kernels. Nothing here imports the kernels or the layers, so both can
import it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mobilenet_arch import conv_output_size

# ----------------------------------------------------------------------------- BatchNorm

# The activations a BatchNorm may end with, and where each passes the gradient, read off its output
# y (the same set as its input's: relu6 passes 0 < x < 6, relu x > 0, as PyTorch's backward does).
ACTIVATIONS = {"relu6": jax.nn.relu6, "relu": jax.nn.relu}
_PASSES = {"relu6": lambda y: (y > 0) & (y < 6), "relu": lambda y: y > 0}


def with_affine(y: jax.Array, mul: jax.Array, add: jax.Array, activation: str | None) -> jax.Array:
    """activation(y * mul + add): eval-mode BatchNorm (`layers.eval_affine`) and its activation."""
    y = y * mul + add
    return ACTIVATIONS[activation](y) if activation else y


def _batch_axes(x):
    return tuple(range(x.ndim - 1))


def batch_norm_statistics(x32):
    """Per-channel mean and biased variance over every axis but the last, the variance in two passes."""
    axes = _batch_axes(x32)
    mean = x32.mean(axes)
    return mean, jnp.square(x32 - mean).mean(axes)


def batch_norm_normalise(x32, mean, mul, bias, activation):
    """activation((x - mean) * mul + bias), mul = scale / std: training-mode BatchNorm's output."""
    return with_affine(x32 - mean, mul, bias, activation)


def passed(g, y, activation):
    """The cotangent g where `activation`'s output y lets the gradient through."""
    return g if activation is None else jnp.where(_PASSES[activation](y), g, 0)


def backward_sums_from_output(g, y, x, mean, activation):
    """sum(g') and sum(g' * (x - mean)) per channel, g' = `passed(g, y, activation)`."""
    kept = passed(g, y, activation)
    axes = _batch_axes(x)
    return kept.sum(axes), (kept * (x - mean)).sum(axes)


def batch_norm_backward_sums(g, x, mean, mul, bias, activation):
    """`backward_sums_from_output` with the activation's mask recomputed from x (the native kernel's form)."""
    return backward_sums_from_output(g, batch_norm_normalise(x, mean, mul, bias, activation), x, mean, activation)


def batch_norm_input_grad(g_passed, centred, mul, rstd, g_bias, g_scale, g_mean, g_var):
    """The standard BatchNorm input gradient from the per-channel terms (each already over n):
    mul * (g' - sum(g')/n - xhat * sum(g' xhat)/n) plus the batch statistics' own cotangents."""
    return mul * (g_passed - g_bias - centred * rstd * g_scale) + (g_mean + g_var * centred)


def batch_norm_backward_input(g, x, terms, activation):
    """`native.batch_norm_backward_input` in XLA's operations."""
    mean, mul, bias, rstd, *rest = terms
    g_passed = passed(g, batch_norm_normalise(x, mean, mul, bias, activation), activation)
    return batch_norm_input_grad(g_passed, x - mean, mul, rstd, *rest)


# ----------------------------------------------------------------------------- convolutions


def xla_depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise 2-D convolution of NHWC `x` with a (k, k, 1, C) kernel, by XLA's grouped convolution.
    Mixed dtypes compute in their promoted one, as the shifted form's multiply-adds do (XLA's
    convolution takes one dtype)."""
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    return lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def xla_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A k x k convolution with groups 1 of NHWC `x` and an HWIO kernel, by XLA's convolution."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pad_spatial(x: jax.Array, low_h: int, high_h: int, low_w: int, high_w: int) -> jax.Array:
    # lax.pad takes negative amounts, which crop: one op shifts and pads at once.
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (low_h, high_h, 0), (low_w, high_w, 0), (0, 0, 0)))


def output_hw(x: jax.Array, k: int, stride: int, padding: int) -> tuple[int, int]:
    """The spatial size of a k x k convolution's output for NHWC `x`."""
    return conv_output_size(x.shape[1], k, stride, padding), conv_output_size(x.shape[2], k, stride, padding)


def padded_input(x, k, stride, padding):
    """x padded by `padding` on every side (as PyTorch pads), and the output size."""
    return pad_spatial(x, padding, padding, padding, padding), output_hw(x, k, stride, padding)


def tap_window(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], stride: int) -> jax.Array:
    """What kernel tap (i, j) sees at every output position: xp[:, stride*o + i, stride*q + j, :]."""
    ho, wo = out_hw
    limit = (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, xp.shape[3])
    return lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))


def patches(x: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    """(N, Ho, Wo, k*k*C): what each output pixel of a k x k convolution sees, in the kernel's
    (i, j, c) order, zero in the padding (x itself for a 1x1 convolution)."""
    if (k, stride, padding) == (1, 1, 0):
        return x
    xp, out_hw = padded_input(x, k, stride, padding)
    return jnp.concatenate([tap_window(xp, i, j, out_hw, stride) for i in range(k) for j in range(k)], axis=-1)
