"""Training-mode BatchNorm's kernels as JAX primitives (`rules`): the batch statistics, the
normalisation with its activation, and the backward's two sums and input gradient. Their
derivatives are their portable forms' (`flax_mobilenet.portable`), so they differentiate again.

The activation's mask in the backward is recomputed from the input x, as (x - mean) * mul + bias
(mul = scale / std) in one multiply-add, the same expression as the forward's: the output y is
never read back.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.core import ShapedArray

from flax_mobilenet import portable
from flax_mobilenet.native import library, partitioning, rules
from flax_mobilenet.native.library import ACTIVATION_CODES, check, check_activation


def _channels_aval(x):
    return ShapedArray(x.shape[-1:], x.dtype)


def _statistics_run(x):
    channels = x.shape[-1:]
    return library.kernel("BatchNormStatistics", (x,), channels, channels)(x)


def _combine_statistics(statistics, axes):
    # Each device holds as many images (jax shards a dimension evenly): the global mean is the mean
    # of the devices' means, the variance adds their spread around it.
    mean, var = statistics
    total = jax.lax.pmean(mean, axes)
    return total, jax.lax.pmean(var + jax.lax.square(mean - total), axes)


def _backward_sums_run(g, x, mean, mul, bias, activation):
    channels = x.shape[-1:]
    call = library.kernel("BatchNormBackwardSums", (g, x, mean, mul, bias), channels, channels)
    return call(g, x, mean, mul, bias, activation=np.int64(ACTIVATION_CODES[activation]))


def _rows(op: str, sharding_rule: str, need_replication_factors: str):
    """The elementwise kernel `op` (activation static, output shaped as its first operand), each
    device running it on its own images: the other operands are per channel."""

    def run(*args):
        arrays, activation = args[:-1], args[-1]
        return library.kernel(op, arrays, arrays[0].shape)(*arrays, activation=np.int64(ACTIVATION_CODES[activation]))

    return partitioning.per_image(run, sharding_rule, static=1, need_replication_factors=need_replication_factors)


_statistics = partitioning.per_image(_statistics_run, "n h w c -> c, c", combine=_combine_statistics, reduction_factors="n h w")
_backward_sums = partitioning.per_image(
    _backward_sums_run, "n h w c, n h w c, c, c, c -> c, c", static=1, combine=partitioning.psum, reduction_factors="n h w"
)
_normalise = _rows("BatchNormNormalise", "n h w c, c, c, c -> n h w c", "h w c")
_backward_input = _rows("BatchNormBackwardInput", "n h w c, n h w c, t c -> n h w c", "h w c t")


def _portable(form):
    """A portable form taking the activation as a keyword, as the primitives' parameters come."""
    return lambda *arrays, activation: form(*arrays, activation)


_statistics_p = rules.primitive(
    "batch_norm_statistics",
    lambda x: _statistics(x),
    portable.batch_norm_statistics,
    lambda x: (_channels_aval(x), _channels_aval(x)),
    rules.per_channel_batch_rule,
    multiple_results=True,
)
_backward_sums_p = rules.primitive(
    "batch_norm_backward_sums",
    lambda g, x, mean, mul, bias, *, activation: _backward_sums(g, x, mean, mul, bias, activation),
    _portable(portable.batch_norm_backward_sums),
    lambda g, x, mean, mul, bias, *, activation: (_channels_aval(x), _channels_aval(x)),
    rules.per_channel_batch_rule,
    multiple_results=True,
)
_normalise_p = rules.primitive(
    "batch_norm_normalise",
    lambda x, mean, mul, bias, *, activation: _normalise(x, mean, mul, bias, activation),
    _portable(portable.batch_norm_normalise),
    lambda x, mean, mul, bias, *, activation: ShapedArray(x.shape, x.dtype),
    rules.per_channel_batch_rule,
)
_backward_input_p = rules.primitive(
    "batch_norm_backward_input",
    lambda g, x, terms, *, activation: _backward_input(g, x, terms, activation),
    _portable(portable.batch_norm_backward_input),
    lambda g, x, terms, *, activation: ShapedArray(x.shape, x.dtype),
    rules.per_channel_batch_rule,
)

rules.portable_jvp(_statistics_p, portable.batch_norm_statistics)
rules.portable_jvp(_backward_sums_p, _portable(portable.batch_norm_backward_sums))
rules.portable_jvp(_normalise_p, _portable(portable.batch_norm_normalise))
rules.portable_jvp(_backward_input_p, _portable(portable.batch_norm_backward_input))


def batch_norm_statistics(x) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over N, H and W of NHWC x, in one read of x (each run
    of 64 rows, in cache, read twice: the variance is two-pass within it; the runs are merged in
    double), where XLA's mean and centred square read x twice."""
    check(x)
    return tuple(_statistics_p.bind(x))


def batch_norm_normalise(x, mean, mul, bias, activation: str | None) -> jax.Array:
    """activation((x - mean) * mul + bias) per channel of NHWC x: training-mode BatchNorm's output
    (mul = scale / std), one read and one write."""
    check(x, mean, mul, bias)
    check_activation(activation)
    return _normalise_p.bind(x, mean, mul, bias, activation=activation)


def batch_norm_backward_sums(g, x, mean, mul, bias, activation: str | None) -> tuple[jax.Array, jax.Array]:
    """sum(g') and sum(g' * (x - mean)) per channel over N, H and W (NHWC operands of one dtype),
    g' being g where `activation` passes the gradient at the pre-activation (x - mean) * mul + bias
    (all of g for None): one read of g and x, where XLA's two reductions read g, y and x twice."""
    check(g, x, mean, mul, bias)
    check_activation(activation)
    return tuple(_backward_sums_p.bind(g, x, mean, mul, bias, activation=activation))


def batch_norm_backward_input(g, x, terms, activation: str | None) -> jax.Array:
    """Training-mode BatchNorm's input gradient (`flax_mobilenet.layers.batch_norm_train`), from the
    cotangent g, the input x and `terms` (8, C): mean, mul, bias, rstd, sum(g')/n, sum(g' xhat)/n,
    d_mean/n and 2 d_var/n, n the pixels per channel. One read of g and x, one write."""
    check(g, x, terms)
    check_activation(activation)
    return _backward_input_p.bind(g, x, terms, activation=activation)
