"""The convolutions' kernels as JAX primitives (`rules`): the depthwise convolution (forward, also
with eval-mode BatchNorm and its activation applied as it writes; input gradient; kernel gradient),
the 1x1 convolution over flattened pixels, and the dense convolution over short patches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.interpreters import ad

from flax_mobilenet import portable
from flax_mobilenet.native import library, partitioning, rules
from flax_mobilenet.native.heuristics import OUTER_NATIVE_MAX
from flax_mobilenet.native.library import ACTIVATION_CODES, check, check_activation


def _images_kernel(op: str, sharding_rule: str, need_replication_factors: str, dense: bool = False):
    """Handler `op`, whose output has the images of its first operand, split over them; its static
    arguments are (out_hw, stride, padding, attrs), attrs a tuple of (name, int). The output has
    the first operand's channels, or (`dense`) the second's last axis (a dense convolution's kernel
    (k, k, C, D), whose C is summed over)."""

    def run(*args):
        arrays, (out_hw, stride, padding, attrs) = args[:-4], args[-4:]
        channels = arrays[1].shape[3] if dense else arrays[0].shape[3]
        return library.call(op, (arrays[0].shape[0], *out_hw, channels), arrays, stride=stride, padding=padding, **dict(attrs))

    return partitioning.per_image(run, sharding_rule, static=4, need_replication_factors=need_replication_factors)


# ----------------------------------------------------------------------------- depthwise convolution

# The portable forms: XLA's depthwise convolution and its transposes.
def _xla_forward(x, taps, *, out_hw, stride, padding):
    return portable.xla_depthwise_conv2d(x, taps[:, :, None, :], stride, padding)


def _xla_input_grad(g, taps, *, in_hw, stride, padding):
    x = jax.ShapeDtypeStruct((g.shape[0], *in_hw, g.shape[3]), g.dtype)
    forward = functools.partial(_xla_forward, taps=taps, out_hw=g.shape[1:3], stride=stride, padding=padding)
    return jax.linear_transpose(forward, x)(g)[0]


def _xla_kernel_grad(x, g, *, k, stride, padding):
    taps = jax.ShapeDtypeStruct((k, k, x.shape[3]), x.dtype)
    forward = lambda taps: _xla_forward(x, taps, out_hw=g.shape[1:3], stride=stride, padding=padding)  # noqa: E731
    return jax.linear_transpose(forward, taps)(g)[0]


def _activation_aval(a, hw):
    return ShapedArray((a.shape[0], *hw, a.shape[3]), a.dtype)


_forward = _images_kernel("DepthwiseForward", "n h w c, i j c -> n o q c", "h w i j o q")
_forward_affine = _images_kernel("DepthwiseForwardAffine", "n h w c, i j c, c, c -> n o q c", "h w i j o q")
_input_grad = _images_kernel("DepthwiseInputGrad", "n o q c, i j c -> n h w c", "o q i j h w")
# The kernel gradient sums over the images: each device's partial sums are summed over devices.
_kernel_grad = partitioning.per_image(
    lambda x, g, k, stride, padding: library.call("DepthwiseKernelGrad", (k, k, x.shape[3]), (x, g), stride=stride, padding=padding),
    "n h w c, n o q c -> i j c", static=3, combine=partitioning.psum, reduction_factors="n", need_replication_factors="h w o q",
)  # fmt: skip

_forward_p = rules.primitive(
    "depthwise_forward",
    lambda x, taps, *, out_hw, stride, padding: _forward(x, taps, out_hw, stride, padding, ()),
    _xla_forward,
    lambda x, taps, *, out_hw, stride, padding: _activation_aval(x, out_hw),
    rules.image_batch_rule,
)
_input_grad_p = rules.primitive(
    "depthwise_input_grad",
    lambda g, taps, *, in_hw, stride, padding: _input_grad(g, taps, in_hw, stride, padding, ()),
    _xla_input_grad,
    lambda g, taps, *, in_hw, stride, padding: _activation_aval(g, in_hw),
    rules.image_batch_rule,
)
_kernel_grad_p = rules.primitive(
    "depthwise_kernel_grad",
    lambda x, g, *, k, stride, padding: _kernel_grad(x, g, k, stride, padding),
    _xla_kernel_grad,
    lambda x, g, *, k, stride, padding: ShapedArray((k, k, x.shape[3]), x.dtype),
    rules.per_channel_batch_rule,
)

# The forward with eval-mode BatchNorm's multiply-add and its activation applied as each output is
# written. Inference only runs the fused kernel: its JVP (so every derivative, and the transposes)
# is the unfused form's, in which the forward is the primitive above.
_forward_affine_p = rules.primitive(
    "depthwise_forward_affine",
    lambda x, taps, mul, add, *, out_hw, stride, padding, activation: _forward_affine(
        x, taps, mul, add, out_hw, stride, padding, (("activation", ACTIVATION_CODES[activation]),)
    ),
    rules.unfused_affine(_xla_forward),
    lambda x, taps, mul, add, *, out_hw, stride, padding, activation: _activation_aval(x, out_hw),
    rules.image_batch_rule,
)
rules.unfused_jvp(_forward_affine_p, rules.unfused_affine(_forward_p.bind))


def forward(x: jax.Array, taps: jax.Array, out_hw: tuple[int, int], stride: int, padding: int) -> jax.Array:
    """y[n, o, q, c] = sum_{i,j} x[n, s*o - p + i, s*q - p + j, c] * taps[i, j, c], zero outside x."""
    check(x, taps)
    return _forward_p.bind(x, taps, out_hw=tuple(out_hw), stride=int(stride), padding=int(padding))


def forward_affine(x, taps, mul, add, out_hw: tuple[int, int], stride: int, padding: int, activation: str | None) -> jax.Array:
    """activation(forward(x, taps) * mul + add), per channel, in one pass: the depthwise layer with
    eval-mode BatchNorm (mul, add) and its activation (a key of ACTIVATION_CODES)."""
    check(x, taps, mul, add)
    check_activation(activation)
    params = dict(out_hw=tuple(out_hw), stride=int(stride), padding=int(padding), activation=activation)
    return _forward_affine_p.bind(x, taps, mul, add, **params)


def input_grad(g: jax.Array, taps: jax.Array, in_hw: tuple[int, int], stride: int, padding: int) -> jax.Array:
    """The gradient of `forward` with respect to x, for the cotangent g."""
    check(g, taps)
    return _input_grad_p.bind(g, taps, in_hw=tuple(in_hw), stride=int(stride), padding=int(padding))


def kernel_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    """The gradient of `forward` with respect to taps (k, k, C), for the cotangent g."""
    check(x, g)
    return _kernel_grad_p.bind(x, g, k=int(k), stride=int(stride), padding=int(padding))


# The three kernels are bilinear, and each one's transposes are the other two, being the partial
# derivatives of one trilinear form <forward(x, taps), g>: forward mode, reverse mode and higher
# derivatives all run the kernels. (Cotangent `ct`; the operand being transposed is an undefined
# primal, of which only the shape is known.)
ad.defbilinear(
    _forward_p,
    lambda ct, x, taps, *, out_hw, stride, padding: input_grad(ct, taps, x.aval.shape[1:3], stride, padding),
    lambda ct, x, taps, *, out_hw, stride, padding: kernel_grad(x, ct, taps.aval.shape[0], stride, padding),
)
ad.defbilinear(
    _input_grad_p,
    lambda ct, g, taps, *, in_hw, stride, padding: forward(ct, taps, g.aval.shape[1:3], stride, padding),
    lambda ct, g, taps, *, in_hw, stride, padding: kernel_grad(ct, g, taps.aval.shape[0], stride, padding),
)
ad.defbilinear(
    _kernel_grad_p,
    lambda ct, x, g, *, k, stride, padding: input_grad(g, ct, x.aval.shape[1:3], stride, padding),
    lambda ct, x, g, *, k, stride, padding: forward(x, ct, g.aval.shape[1:3], stride, padding),
)


# ----------------------------------------------------------------------------- 1x1 convolution

# The 1x1 convolution over flattened pixels, x (P, A) times w (A, B), as a primitive of its own so
# that its transposes are ours: the kernel's is `pixel_outer` (x^T g), which runs in the native
# kernel on the CPU where the output is small (`heuristics.OUTER_NATIVE_MAX`); the input's is the
# product by w^T. The product itself is XLA's dot everywhere.


def _xla_channel_product(x, w):
    return jnp.dot(x, w)


def _xla_pixel_outer(x, g):
    return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))


def _pixels_batch_rule(primitive):
    """vmap of the product: a map over x alone (w shared) folds into the pixels, (V, P, A) ->
    (V * P, A), so the transposes stay ours; else a batched dot."""

    def rule(args, dims, **params):
        if dims[1] is not None:
            return rules.portable_batch_rule(_xla_channel_product)(primitive)(args, dims, **params)
        x = jnp.moveaxis(args[0], dims[0], 0)
        out = primitive.bind(x.reshape(-1, x.shape[-1]), args[1], **params)
        return out.reshape(x.shape[0], -1, out.shape[-1]), 0

    return rule


# Summed over the pixels: each device's partial sums are summed over devices.
_pixel_outer = partitioning.per_image(
    lambda x, g: library.kernel("PointwiseKernelGrad", (x, g), (x.shape[1], g.shape[1]))(x, g),
    "p a, p b -> a b", combine=partitioning.psum, reduction_factors="p",
)


def _pixel_outer_impl(x, g):
    native = jax.default_backend() == "cpu" and x.shape[1] * g.shape[1] <= OUTER_NATIVE_MAX and library.supports(x, g) and library.available()
    return _pixel_outer(x, g) if native else _xla_pixel_outer(x, g)


_channel_product_p = rules.primitive(
    "channel_product",
    _xla_channel_product,
    _xla_channel_product,
    lambda x, w: ShapedArray((x.shape[0], w.shape[1]), x.dtype),
    _pixels_batch_rule,
)
_pixel_outer_p = rules.primitive(
    "pixel_outer",
    _pixel_outer_impl,
    _xla_pixel_outer,
    lambda x, g: ShapedArray((x.shape[1], g.shape[1]), x.dtype),
    rules.portable_batch_rule(_xla_pixel_outer),
)
ad.defbilinear(
    _channel_product_p,
    lambda ct, x, w: channel_product(ct, w.T),
    lambda ct, x, w: pixel_outer(x, ct),
)
ad.defbilinear(
    _pixel_outer_p,
    lambda ct, x, g: channel_product(g, ct.T),
    lambda ct, x, g: channel_product(x, ct),
)


def channel_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (P, A) times w (A, B): a 1x1 convolution over flattened pixels, whose kernel gradient runs
    in the native kernel where it pays (`pixel_outer`)."""
    return _channel_product_p.bind(x, w)


def pixel_outer(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T g for x (P, A) and g (P, B), summed over the P pixels: `channel_product`'s kernel
    gradient. The native kernel on the CPU where A * B <= OUTER_NATIVE_MAX, else XLA's dot."""
    return _pixel_outer_p.bind(x, g)


# ----------------------------------------------------------------------------- dense convolution

# A convolution with groups 1 whose patch is short (the stem's 3x3 over 3 channels; a 1x1 layer),
# NHWC x times w (k, k, C, D), in the native kernel: the patches are gathered in registers, not
# written out as XLA's form does (layers.PatchConv). Eval-mode BatchNorm and its activation can be
# applied as it writes (`dense_conv_affine`), as the depthwise forward does. Its transposes are
# XLA's patches and our 1x1 primitives: the kernel's is `pixel_outer` of the patches and the
# cotangent (the native kernel where it is small), the input's the product by w^T, scattered
# back to the pixels by the patches' transpose.


def _xla_dense(x, w, *, stride, padding):
    return portable.xla_conv2d(x, w, stride, padding)


def _dense_linear(x, w, *, stride, padding):
    """The dense convolution as the primitive whose transposes suit it: a 1x1 layer's is
    `channel_product`, any other `dense_conv`'s."""
    if (w.shape[0], stride, padding) == (1, 1, 0):
        return channel_product(x.reshape(-1, x.shape[-1]), w[0, 0]).reshape(*x.shape[:-1], w.shape[-1])
    return _dense_p.bind(x, w, stride=stride, padding=padding)


def _dense_aval(x, w, stride, padding):
    return ShapedArray((x.shape[0], *portable.output_hw(x, w.shape[0], stride, padding), w.shape[3]), x.dtype)


_dense = _images_kernel("DenseConv", "n h w c, i j c d -> n o q d", "h w c i j d o q", dense=True)
_dense_affine = _images_kernel("DenseConvAffine", "n h w c, i j c d, d, d -> n o q d", "h w c i j d o q", dense=True)

_dense_p = rules.primitive(
    "dense_conv",
    lambda x, w, *, stride, padding: _dense(x, w, portable.output_hw(x, w.shape[0], stride, padding), stride, padding, ()),
    _xla_dense,
    lambda x, w, *, stride, padding: _dense_aval(x, w, stride, padding),
    functools.partial(rules.image_batch_rule, otherwise=rules.portable_batch_rule(_xla_dense)),
)


# The transposes (x or w is the undefined primal, known by its aval).
def _dense_input_transpose(ct, x, w, *, stride, padding):
    k, d = w.shape[0], w.shape[3]
    kkc = k * k * w.shape[2]
    g = channel_product(ct.reshape(-1, d), w.reshape(kkc, d).T).reshape(*ct.shape[:-1], kkc)
    x_aval = jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype)
    return jax.linear_transpose(functools.partial(portable.patches, k=k, stride=stride, padding=padding), x_aval)(g)[0]


def _dense_kernel_transpose(ct, x, w, *, stride, padding):
    k, c, d = w.aval.shape[0], w.aval.shape[2], w.aval.shape[3]
    p = portable.patches(x, k, stride, padding)
    return pixel_outer(p.reshape(-1, k * k * c), ct.reshape(-1, d)).reshape(k, k, c, d)


ad.defbilinear(_dense_p, _dense_input_transpose, _dense_kernel_transpose)


_dense_affine_p = rules.primitive(
    "dense_conv_affine",
    lambda x, w, mul, add, *, stride, padding, activation: _dense_affine(
        x, w, mul, add, portable.output_hw(x, w.shape[0], stride, padding), stride, padding, (("activation", ACTIVATION_CODES[activation]),)
    ),
    rules.unfused_affine(_xla_dense),
    lambda x, w, mul, add, *, stride, padding, activation: _dense_aval(x, w, stride, padding),
    functools.partial(rules.image_batch_rule, otherwise=rules.portable_batch_rule(rules.unfused_affine(_xla_dense))),
)
rules.unfused_jvp(_dense_affine_p, rules.unfused_affine(_dense_linear))


def dense_conv(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """y[n, o, q, :] = sum_{i,j,c} x[n, s*o - p + i, s*q - p + j, c] * w[i, j, c, :], zero outside x:
    NHWC x, w (k, k, C, D), groups 1, in the native kernel."""
    check(x, w)
    return _dense_p.bind(x, w, stride=int(stride), padding=int(padding))


def dense_conv_affine(x, w, mul, add, stride: int, padding: int, activation: str | None) -> jax.Array:
    """activation(dense_conv(x, w) * mul + add), per output channel, in one pass: the layer with
    eval-mode BatchNorm (mul, add) and its activation (a key of ACTIVATION_CODES)."""
    check(x, w, mul, add)
    check_activation(activation)
    return _dense_affine_p.bind(x, w, mul, add, stride=int(stride), padding=int(padding), activation=activation)
