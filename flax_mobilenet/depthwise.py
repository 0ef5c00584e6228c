"""The depthwise convolution of both models, in one place so that its implementation can be chosen
per backend without touching the models."""

from __future__ import annotations

import jax
from jax import lax


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise 2-D convolution of NHWC `x` with a (k, k, 1, C) kernel, symmetric padding."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )
