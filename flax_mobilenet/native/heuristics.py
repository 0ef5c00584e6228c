"""Where a native kernel runs faster than XLA's dot, and so where it is used (`python -m bench`
measures both sides on this machine)."""

from __future__ import annotations

import math

from flax_mobilenet.native.library import vector_registers

# The 1x1 convolution's kernel gradient x^T g: its output is small (channels in x channels out)
# and its sum long (every pixel of the batch), a shape XLA's CPU dot runs well below its peak; the
# native kernel sums each tile of outputs in registers. Up to this many outputs it runs there.
OUTER_NATIVE_MAX = 4096

# The most weights (k*k*C*D) for which `dense_conv` runs as fast as XLA's dot: it streams all of w
# for every 8 output pixels, which stays in cache up to about this (256 KiB in float32); XLA's dot
# blocks larger products better.
DENSE_NATIVE_MAX = 65536


def dense_pays(kernel_shape: tuple[int, ...]) -> bool:
    """Whether `dense_conv` runs a layer with this kernel (k, k, C, D) at least as fast as XLA's
    dot on this CPU: at most DENSE_NATIVE_MAX weights, and either k > 1 (XLA writes the patches
    out; the stem) or a build with 32 vector registers (AVX-512). With AVX2's 16, XLA's dot ran
    the 1x1 layers faster."""
    return math.prod(kernel_shape) <= DENSE_NATIVE_MAX and (kernel_shape[0] > 1 or vector_registers() >= 32)
