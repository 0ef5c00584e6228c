"""The depthwise convolution of both models, in one place so that its implementation can be chosen
per backend without touching the models.

Three implementations compute the same function:

- ``"xla"``: `lax.conv_general_dilated` with `feature_group_count=C`. XLA's CPU backend lowers a
  grouped convolution to a slow generic loop, forward and (much worse) backward: about 10x slower
  than PyTorch on a 3x3 depthwise layer (jax-ml/jax#23713, google/flax#4207). On GPU and TPU it
  goes to cuDNN / the TPU convolution unit and is the default there.
- ``"shifted"``: k*k strided slices of the padded input, each times one kernel tap, summed; XLA
  fuses this into one elementwise loop. Its gradient is written by hand (`jax.custom_vjp`) in the
  same form, because autodiff of the slices would produce k*k padded full-size buffers; the input
  gradient is split into stride*stride phases so that a stride-2 layer does no multiply by zero.
- ``"native"``: CPU kernels of our own through `jax.ffi` (`flax_mobilenet.native`), forward, input
  gradient and kernel gradient, each one pass over its operands with no padded copy. float32 and
  float64 only; other dtypes, and machines where the kernels cannot be built (no C++ compiler),
  fall back to "shifted". The kernels are JAX primitives: jit, vmap, forward and reverse mode and
  higher derivatives all go through them (each kernel's derivatives are the other two).

"native" is decided per platform when the program is lowered, not by the host that traces it: the
kernels, and the "shifted" fallback, are the CPU's code; a program lowered for a GPU or TPU (from
any host) gets ``"xla"``'s convolution in their place, in every dtype (`backend.on_cpu`).

``"auto"`` (the default) picks "native" on the CPU and "xla" elsewhere, from
`jax.default_backend()` at trace time; the environment variable ``FLAX_MOBILENET_DEPTHWISE``
overrides it (`flax_mobilenet.backend`, where every such choice is made).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flax_mobilenet import backend, native
from flax_mobilenet.portable import output_hw, pad_spatial, padded_input, tap_window, with_affine, xla_depthwise_conv2d

# The switch's name and the choice it makes, where callers of this module look for them.
ENV_VAR = backend.DEPTHWISE_ENV
implementation = backend.depthwise


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise 2-D convolution of NHWC `x` with a (k, k, 1, C) kernel, symmetric padding."""
    choice = implementation()
    if choice == "native":
        return native_depthwise_conv2d(x, kernel, stride, padding)
    if choice == "shifted":
        return shifted_depthwise_conv2d(x, kernel, stride, padding)
    return xla_depthwise_conv2d(x, kernel, stride, padding)


def depthwise_conv2d_affine(x, kernel, stride: int, padding: int, mul, add, activation: str | None) -> jax.Array:
    """activation(depthwise_conv2d(x, kernel) * mul + add), mul and add per channel: the layer with
    eval-mode BatchNorm and its activation. The native kernel applies them as it writes each output,
    so no pass reads the convolution's output back; the other forms compose the same operations."""
    if backend.native_depthwise(x, kernel, mul, add):
        return native.forward_affine(x, kernel[:, :, 0, :], mul, add, output_hw(x, kernel.shape[0], stride, padding), stride, padding, activation)
    return with_affine(depthwise_conv2d(x, kernel, stride, padding), mul, add, activation)


def _accumulation_dtype(dtype) -> jnp.dtype:
    # Sum the k*k products in float32 for half-precision inputs, as a convolution unit does.
    return jnp.promote_types(dtype, jnp.float32)


def _taps_sum(xp, taps, out_hw, stride, out_dtype):
    """sum_{i,j} xp[:, stride*o + i, stride*q + j, :] * taps[i, j, :] for o, q < out_hw.

    `xp` is an already padded (materialised) array. Per-tap pads fused into the loop avoid
    writing it, and win on a bare input; in a network, though, XLA fuses the producer (the previous
    layer's BatchNorm and activation, or their backward) into each tap and computes it k*k times,
    which measured slower than writing the padded array once.
    """
    acc = _accumulation_dtype(out_dtype)
    total = None
    for i in range(taps.shape[0]):
        for j in range(taps.shape[1]):
            term = tap_window(xp, i, j, out_hw, stride).astype(acc) * taps[i, j].astype(acc)
            total = term if total is None else total + term
    return total.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`xla_depthwise_conv2d` as k*k shifted multiply-adds, with a hand-written VJP of the same form."""
    return _fwd(x, kernel, stride, padding)[0]


def _fwd(x, kernel, stride, padding):
    xp, out_hw = padded_input(x, kernel.shape[0], stride, padding)
    y = _taps_sum(xp, kernel[:, :, 0, :], out_hw, stride, jnp.result_type(x, kernel))
    # The padded input is kept rather than x: the kernel gradient reads it, and it is written once.
    return y, (xp, kernel)


def _bwd(stride, padding, residuals, g):
    xp, kernel = residuals
    n, hp, wp, c = xp.shape
    x_shape = (n, hp - 2 * padding, wp - 2 * padding, c)
    return _input_grad(g, kernel, x_shape, stride, padding), _kernel_grad(xp, g, kernel, stride)


def _input_grad(g, kernel, x_shape, stride, padding):
    """The transposed convolution: output position (o, q) sends g * tap (i, j) to padded input
    position (stride*o + i, stride*q + j).

    Padded input row r = stride*m + a (phase a < stride) receives from the taps i = a + stride*t,
    from output row m - t. So each of the stride*stride phases is a stride-1 correlation of g with
    that phase's taps reversed, and the phases interleave into the padded input. Done this way a
    stride-2 layer multiplies only by real taps, never by the zeros of a dilated cotangent.
    """
    n, h, w, c = x_shape
    k = kernel.shape[0]
    taps = kernel[:, :, 0, :]
    dtype = jnp.result_type(g, kernel)
    # Rows per phase, rounded up so that the phases interleave to a full grid covering the input.
    mh, mw = -(-(h + 2 * padding) // stride), -(-(w + 2 * padding) // stride)
    tmax = (k - 1) // stride  # the most output rows a phase reaches back
    gp = pad_spatial(g, tmax, mh - g.shape[1], tmax, mw - g.shape[2])
    phases = []
    for a in range(stride):
        row = []
        for b in range(stride):
            sub = taps[a::stride, b::stride][::-1, ::-1]
            window = gp[:, tmax - (sub.shape[0] - 1) :, tmax - (sub.shape[1] - 1) :, :]
            row.append(_taps_sum(window, sub, (mh, mw), 1, dtype))
        phases.append(row)
    if stride == 1:
        full = phases[0][0]
    else:
        # (n, mh, stride, mw, stride, c) -> (n, mh*stride, mw*stride, c): the padded input's grid.
        full = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2).reshape(n, mh * stride, mw * stride, c)
    return full[:, padding : padding + h, padding : padding + w, :]


# The kernel gradient's working set: each tap's window is written out (see `_kernel_grad`), and a
# window of at most this many bytes stays in the cache (L2, about 1 MiB per core on the CPUs
# measured) while it is written and read back; 2 MiB ran faster than 4 and 8 MiB and than bands
# of rows (the shifted form's line of `python -m bench --depthwise`).
KERNEL_GRAD_CHUNK_BYTES = 2 << 20


def _images_per_chunk(xp, max_bytes: int) -> int:
    """The largest divisor of the batch whose padded images fit in `max_bytes` (at least 1)."""
    n = xp.shape[0]
    per_image = xp[0].size * xp.dtype.itemsize
    return max(d for d in range(1, n + 1) if n % d == 0 and (d == 1 or d * per_image <= max_bytes))


def _kernel_grad(xp, g, kernel, stride):
    """d kernel[i, j, 0, c] = sum over n, o, q of the (i, j)-shifted padded input times g.

    XLA's CPU reduction (a YNNPACK fusion) cannot fuse the shifted slice, so each tap writes its
    window out before reducing it. Two loops keep that write cheap: a `lax.scan` over the k*k taps
    reuses one window buffer (unrolled, XLA would keep all k*k windows live at once), and an outer
    `lax.scan` over chunks of whole images keeps that buffer small enough
    (`KERNEL_GRAD_CHUNK_BYTES`) to be written to and read back from the cache, not memory.
    """
    n, _, _, c = xp.shape
    k = kernel.shape[0]
    ho, wo = g.shape[1], g.shape[2]
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    acc = _accumulation_dtype(jnp.result_type(xp, g))
    chunk = _images_per_chunk(xp, KERNEL_GRAD_CHUNK_BYTES)
    offsets = jnp.array([(i, j) for i in range(k) for j in range(k)], jnp.int32)

    def images(total, first):
        zero = jnp.zeros((), first.dtype)  # start indices of one integer type, also under jax_enable_x64
        g_chunk = lax.dynamic_slice(g, (first, zero, zero, zero), (chunk, ho, wo, c)).astype(acc)

        def tap(carry, ij):
            window = lax.dynamic_slice(xp, (first, ij[0], ij[1], zero), (chunk, span_h, span_w, c))
            if stride > 1:
                window = window[:, ::stride, ::stride]
            return carry, jnp.sum(window.astype(acc) * g_chunk, axis=(0, 1, 2))

        return total + lax.scan(tap, None, offsets)[1], None

    firsts = jnp.arange(0, n, chunk, dtype=jnp.int32)
    total = lax.scan(images, jnp.zeros((k * k, c), acc), firsts)[0]
    return total.reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise_conv2d.defvjp(_fwd, _bwd)


def native_depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`xla_depthwise_conv2d` by the `flax_mobilenet.native` CPU kernels, where they are built and
    take the dtype; else by `shifted_depthwise_conv2d`. Both are the CPU's forms: lowered for any
    other platform, either is `xla_depthwise_conv2d`."""
    if native.supports(x, kernel) and native.available():
        return native.forward(x, kernel[:, :, 0, :], output_hw(x, kernel.shape[0], stride, padding), stride, padding)
    return backend.on_cpu(lambda x, kernel: shifted_depthwise_conv2d(x, kernel, stride, padding),
                          lambda x, kernel: xla_depthwise_conv2d(x, kernel, stride, padding), x, kernel)  # fmt: skip
