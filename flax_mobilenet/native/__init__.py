"""CPU kernels of our own, called from XLA through `jax.ffi` (kernels.cc beside this file): the
depthwise convolution's forward (also with eval-mode BatchNorm and its activation applied as it
writes), input gradient and kernel gradient, the 1x1 convolution's kernel gradient, a dense
convolution over short patches (the stem, and 1x1 layers, in eval mode with BatchNorm and its
activation applied as it writes), and BatchNorm's batch statistics and the two sums of its
backward. Each is a JAX primitive, so that jit, vmap and autodiff to any order go through them.

The package by job:

- `library`: compiling kernels.cc into a cache on first use, loading it, calling its handlers;
- `rules`: how a kernel becomes a primitive (lowering, vmap, JVP);
- `partitioning`: how the kernels split over devices under a sharded batch;
- `convolutions`, `batch_norm`: the primitives and their transposes;
- `heuristics`: where a kernel runs faster than XLA's dot.

Where the library cannot be built (no compiler, a failed build), `available()` is False, a warning
says why once, and the callers use the pure-JAX forms of `flax_mobilenet.portable` instead
(`flax_mobilenet.backend` decides).
"""

from flax_mobilenet.native.batch_norm import batch_norm_backward_input, batch_norm_backward_sums, batch_norm_normalise, batch_norm_statistics
from flax_mobilenet.native.convolutions import channel_product, dense_conv, dense_conv_affine, forward, forward_affine, input_grad, kernel_grad, pixel_outer
from flax_mobilenet.native.heuristics import DENSE_NATIVE_MAX, OUTER_NATIVE_MAX, dense_pays
# `_command` too: `python -m bench.kernels` compiles its benchmark with the library's own command.
from flax_mobilenet.native.library import ACTIVATION_CODES, CACHE_ENV, DTYPES, SOURCE, _command, available, build_id, cache_dir, supports, vector_registers

__all__ = [
    "ACTIVATION_CODES", "CACHE_ENV", "DENSE_NATIVE_MAX", "DTYPES", "OUTER_NATIVE_MAX", "SOURCE", "available",
    "batch_norm_backward_input", "batch_norm_backward_sums", "batch_norm_normalise", "batch_norm_statistics",
    "build_id", "cache_dir", "channel_product", "dense_conv", "dense_conv_affine", "dense_pays", "forward",
    "forward_affine", "input_grad", "kernel_grad", "pixel_outer", "supports", "vector_registers",
]  # fmt: skip
