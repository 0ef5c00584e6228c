"""CPU kernels of our own, called from XLA through `jax.ffi` (kernels.cc beside this file): the
depthwise convolution's forward (also with eval-mode BatchNorm and its activation applied as it
writes), input gradient and kernel gradient, the 1x1 convolution's kernel gradient, a dense
convolution over short patches (the stem, and 1x1 layers, in eval mode with BatchNorm and its
activation applied as it writes), and BatchNorm's batch statistics and the two sums of its
backward. Each is a JAX primitive (end of
this file), so that jit, vmap and autodiff to any order go through them.

The library is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``)
against the XLA FFI headers that jaxlib ships, for this machine's processor, and kept in a cache
(``$FLAX_MOBILENET_CACHE``, else ``$XDG_CACHE_HOME/flax_mobilenet``, else
``~/.cache/flax_mobilenet``) under a name that hashes the source, the compiler command, jaxlib's
version and the processor's flags; later processes load it from there. Building takes a few
seconds once.

Where it cannot be built (no compiler, a failed build), `available()` is False, a warning says
why once, and the callers use their pure-JAX forms instead: `flax_mobilenet.depthwise` the
shifted convolution, `flax_mobilenet.layers` XLA's reductions. `choose` is how both pick.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax._src import dispatch
from jax.interpreters import ad, batching, mlir

SOURCE = Path(__file__).with_name("kernels.cc")
CACHE_ENV = "FLAX_MOBILENET_CACHE"
# The dtypes with a kernel, and the suffix of their handlers' symbols in kernels.cc.
DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
# The handlers in kernels.cc, each defined for every dtype (symbol: op + suffix).
OPS = ("DepthwiseForward", "DepthwiseForwardAffine", "DepthwiseInputGrad", "DepthwiseKernelGrad", "PointwiseKernelGrad", "DenseConv", "DenseConvAffine", "BatchNormStatistics", "BatchNormBackwardSums", "BatchNormNormalise", "BatchNormBackwardInput")
# The activations the kernels know, by code (kernels.cc: BatchNorm's training passes apply it and
# recompute its mask from the input, the depthwise forward and the dense convolution apply it after
# eval-mode BatchNorm).
ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}


def cache_dir() -> Path:
    """Where built kernels are kept, and train.main's compiled programs (`programs_dir()`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flax_mobilenet"


def _processor_flags() -> str:
    """What -march=native compiles for: the CPU's feature flags (a build is not portable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _command(output: Path) -> list[str]:
    cxx = os.environ.get("CXX") or "c++"
    return [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-DNDEBUG",
            "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(output)]  # fmt: skip


# The oldest jaxlib the kernels were built and tested with (the FFI's CPU thread pool, the
# custom_partitioning sharding rules); older ones take the pure-JAX form.
MIN_JAXLIB = (0, 10)


def _library_path() -> Path:
    """The library's place in the cache, named by a hash of what it is built from."""
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_command(Path("out"))).encode(), jaxlib.__version__.encode(), _processor_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def programs_dir() -> Path:
    """Where train.main keeps XLA's compiled programs between runs (`train.step.use_compilation_cache`):
    a folder per build of the kernels, so that a program compiled beside one build never runs
    with another's handlers."""
    return cache_dir() / "xla" / _library_path().stem


def _build() -> Path:
    """The compiled library's path, building it into the cache first if it is not there."""
    import jaxlib

    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    if version < MIN_JAXLIB:
        raise RuntimeError(f"jaxlib {jaxlib.__version__} is older than {'.'.join(map(str, MIN_JAXLIB))}, the oldest tested")

    target = _library_path()
    if target.exists():
        return target
    if shutil.which(_command(target)[0]) is None:
        raise RuntimeError(f"no C++ compiler {_command(target)[0]!r} on PATH (set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process never loads a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run(_command(partial), capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{' '.join(_command(partial))} failed: {last}")
        os.replace(partial, target)
    return target


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str | None]:
    """Builds, loads and registers the handlers once per process: the library, or the reason it
    could not be."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except Exception as error:  # noqa: BLE001  any failure to build or load means the pure-JAX form
        return None, f"{type(error).__name__}: {error}" if not isinstance(error, RuntimeError) else str(error)
    for suffix in DTYPES.values():
        for op in OPS:
            jax.ffi.register_ffi_target(_target(op, suffix), jax.ffi.pycapsule(getattr(library, f"{op}{suffix}")), platform="cpu")
    return library, None


def _registered() -> str | None:
    return _loaded()[1]


def vector_registers() -> int:
    """How many vector registers the kernels were built for: 32 with AVX-512, 16 otherwise (0
    where they are not built)."""
    library = _loaded()[0]
    return 0 if library is None else library.VectorRegisters()


def _target(op: str, suffix: str) -> str:
    return f"flax_mobilenet_{op.lower()}_{suffix.lower()}"


def available() -> bool:
    """Whether the kernels are built and registered (building them on the first call)."""
    problem = _registered()
    if problem is not None:
        _warn_once(problem)
    return problem is None


@functools.cache
def _warn_once(problem: str) -> None:
    warnings.warn(f"flax_mobilenet: the native CPU kernels are not available ({problem}); using the pure-JAX forms", stacklevel=3)


def supports(*arrays) -> bool:
    """Whether the kernels take these operands: one dtype among DTYPES."""
    dtypes = {np.dtype(a.dtype) for a in arrays}
    return len(dtypes) == 1 and dtypes.pop() in DTYPES


def choose(env_var: str, options: tuple[str, ...], auto: dict[str, str], backend: str | None = None) -> str:
    """The implementation named by `env_var` (one of `options`, or "auto": `auto`'s entry for the
    backend, else "xla"), read at trace time."""
    choice = os.environ.get(env_var, "auto").strip().lower() or "auto"
    if choice == "auto":
        return auto.get(backend or jax.default_backend(), "xla")
    if choice not in options:
        raise ValueError(f"{env_var}={choice!r}: expected one of auto, {', '.join(options)}")
    return choice


def _check(*operands) -> None:
    """A clear error where the kernels cannot run on these operands."""
    problem = _registered()
    if problem is not None:
        raise RuntimeError(f"the native kernels are not available: {problem}")
    if not supports(*operands):
        raise TypeError(f"native kernels take one dtype among {sorted(map(str, DTYPES))}, got {[str(a.dtype) for a in operands]}")


def _check_activation(activation) -> None:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation {activation!r}: expected one of {list(ACTIVATION_CODES)}")


def _kernel(op: str, operands, *shapes):
    """The ffi_call of handler `op` for the operands' dtype, with one output of each shape in that
    dtype."""
    _check(*operands)
    dtype = np.dtype(operands[0].dtype)
    out = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes)
    return jax.ffi.ffi_call(_target(op, DTYPES[dtype]), out if len(out) > 1 else out[0])


def _call(op: str, out_shape: tuple[int, ...], operands, stride: int, padding: int, **attrs) -> jax.Array:
    ints = {name: np.int64(value) for name, value in dict(stride=stride, padding=padding, **attrs).items()}
    return _kernel(op, operands, out_shape)(*operands, **ints)


# Under `jax.jit` with the batch sharded over devices (train.distributed), XLA would gather a custom
# call's operands onto every device. `custom_partitioning` says how the kernels split instead: each
# device runs them on its own images (the kernel gradient's partial sums then summed over the
# batch's mesh axes); channels and pixels stay whole on each device.


def _batch_axes(sharding) -> str | tuple | None:
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _per_image(sharding, mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(_batch_axes(sharding)))


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def _batch_parallel(op: str, sharding_rule: str, operands: int = 2, dense: bool = False):
    """The kernel `op`, whose output has the batch of its first operand (of `operands`), split over
    images; its static arguments are (out_hw, stride, padding, attrs), attrs a tuple of (name, int).
    The output has the first operand's channels, or (`dense`) the second's last axis (a dense
    convolution's kernel (k, k, C, D), whose C is summed over: kept whole on each device)."""
    from jax.experimental.custom_partitioning import custom_partitioning

    def run(*args):
        arrays, (out_hw, stride, padding, attrs) = args[:operands], args[operands:]
        channels = arrays[1].shape[3] if dense else arrays[0].shape[3]
        return _call(op, (arrays[0].shape[0], *out_hw, channels), arrays, stride, padding, **dict(attrs))

    def partition(out_hw, stride, padding, attrs, mesh, arg_shapes, result_shape):
        images = _per_image(arg_shapes[0].sharding, mesh)
        shared = (_replicated(mesh),) * (operands - 1)
        return mesh, lambda *arrays: run(*arrays, out_hw, stride, padding, attrs), images, (images, *shared)

    def infer(out_hw, stride, padding, attrs, mesh, arg_shapes, result_shape):
        return _per_image(arg_shapes[0].sharding, mesh)

    fn = custom_partitioning(run, static_argnums=tuple(range(operands, operands + 4)))
    factors = dict.fromkeys(sharding_rule.replace(",", " ").replace("->", " ").split())
    split = ("n",) if dense else ("n", "c")
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                     need_replication_factors=tuple(f for f in factors if f not in split))  # fmt: skip
    return fn


def _kernel_grad_partitioned():
    from jax.experimental.custom_partitioning import custom_partitioning

    def run(x, g, k, stride, padding):
        return _call("DepthwiseKernelGrad", (k, k, x.shape[3]), (x, g), stride, padding)

    def partition(k, stride, padding, mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes[0].sharding)
        images = _per_image(arg_shapes[0].sharding, mesh)

        def lower(x, g):
            partial = run(x, g, k, stride, padding)
            return partial if axes is None else jax.lax.psum(partial, axes)

        return mesh, lower, _replicated(mesh), (images, images)

    def infer(k, stride, padding, mesh, arg_shapes, result_shape):
        return _replicated(mesh)

    fn = custom_partitioning(run, static_argnums=(2, 3, 4))
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule="n h w c, n o q c -> i j c",
                     reduction_factors=("n",), need_replication_factors=("h", "w", "o", "q"))  # fmt: skip
    return fn


@functools.cache
def _pixel_outer_partitioned():
    from jax.experimental.custom_partitioning import custom_partitioning

    def run(x, g):
        return _kernel("PointwiseKernelGrad", (x, g), (x.shape[1], g.shape[1]))(x, g)

    def partition(mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes[0].sharding)
        pixels = _per_image(arg_shapes[0].sharding, mesh)

        def lower(x, g):
            partial = run(x, g)
            return partial if axes is None else jax.lax.psum(partial, axes)

        return mesh, lower, _replicated(mesh), (pixels, pixels)

    def infer(mesh, arg_shapes, result_shape):
        return _replicated(mesh)

    fn = custom_partitioning(run)
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule="p a, p b -> a b", reduction_factors=("p",))
    return fn


@functools.cache
def _partitioned():
    # Made on first use, so that importing the package never depends on this API's version.
    return {
        "Forward": _batch_parallel("DepthwiseForward", "n h w c, i j c -> n o q c"),
        "ForwardAffine": _batch_parallel("DepthwiseForwardAffine", "n h w c, i j c, c, c -> n o q c", operands=4),
        "InputGrad": _batch_parallel("DepthwiseInputGrad", "n o q c, i j c -> n h w c"),
        "KernelGrad": _kernel_grad_partitioned(),
        "Dense": _batch_parallel("DenseConv", "n h w c, i j c d -> n o q d", dense=True),
        "DenseAffine": _batch_parallel("DenseConvAffine", "n h w c, i j c d, d, d -> n o q d", operands=4, dense=True),
    }


# ----------------------------------------------------------------------------- BatchNorm


def _backward_sums_run(g, x, mean, mul, bias, activation):
    channels = x.shape[-1:]
    call = _kernel("BatchNormBackwardSums", (g, x, mean, mul, bias), channels, channels)
    return call(g, x, mean, mul, bias, activation=np.int64(ACTIVATION_CODES[activation]))


@functools.cache
def _backward_sums_partitioned():
    from jax.experimental.custom_partitioning import custom_partitioning

    def partition(activation, mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes[0].sharding)
        images = _per_image(arg_shapes[0].sharding, mesh)

        def lower(g, x, mean, mul, bias):
            sums = _backward_sums_run(g, x, mean, mul, bias, activation)
            return sums if axes is None else tuple(jax.lax.psum(part, axes) for part in sums)

        replicated = _replicated(mesh)
        return mesh, lower, (replicated, replicated), (images, images, replicated, replicated, replicated)

    def infer(activation, mesh, arg_shapes, result_shape):
        return (_replicated(mesh), _replicated(mesh))

    fn = custom_partitioning(_backward_sums_run, static_argnums=(5,))
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule="n h w c, n h w c, c, c, c -> c, c",
                     reduction_factors=("n", "h", "w"))  # fmt: skip
    return fn


@functools.cache
def _rows_partitioned(op: str, sharding_rule: str):
    """The elementwise BatchNorm kernel `op` (activation code static, output shaped as its first
    operand), each device running it on its own images: the other operands are per channel."""
    from jax.experimental.custom_partitioning import custom_partitioning

    def run(*args):
        arrays, activation = args[:-1], args[-1]
        return _kernel(op, arrays, arrays[0].shape)(*arrays, activation=np.int64(ACTIVATION_CODES[activation]))

    def partition(activation, mesh, arg_shapes, result_shape):
        images = _per_image(arg_shapes[0].sharding, mesh)
        shardings = tuple(images if len(a.shape) == 4 else _replicated(mesh) for a in arg_shapes)
        return mesh, lambda *arrays: run(*arrays, activation), images, shardings

    def infer(activation, mesh, arg_shapes, result_shape):
        return _per_image(arg_shapes[0].sharding, mesh)

    operands = sharding_rule.split("->")[0].count(",") + 1
    fn = custom_partitioning(run, static_argnums=(operands,))
    factors = dict.fromkeys(sharding_rule.replace(",", " ").replace("->", " ").split())
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                     need_replication_factors=tuple(f for f in factors if f != "n"))  # fmt: skip
    return fn


def _statistics_run(x):
    channels = x.shape[-1:]
    return _kernel("BatchNormStatistics", (x,), channels, channels)(x)


@functools.cache
def _statistics_partitioned():
    from jax.experimental.custom_partitioning import custom_partitioning

    def partition(mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes[0].sharding)

        def lower(x):
            mean, var = _statistics_run(x)
            if axes is None:
                return mean, var
            # Each device holds as many images (jax shards a dimension evenly): the global mean is
            # the mean of the devices' means, the variance adds their spread around it.
            total = jax.lax.pmean(mean, axes)
            return total, jax.lax.pmean(var + jax.lax.square(mean - total), axes)

        replicated = _replicated(mesh)
        return mesh, lower, (replicated, replicated), (_per_image(arg_shapes[0].sharding, mesh),)

    def infer(mesh, arg_shapes, result_shape):
        return (_replicated(mesh), _replicated(mesh))

    fn = custom_partitioning(_statistics_run)
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule="n h w c -> c, c", reduction_factors=("n", "h", "w"))
    return fn


# ----------------------------------------------------------------------------- JAX primitives

# Each kernel is a JAX primitive of its own, so that every transformation goes through it:
# - jit: lowered on the CPU to the custom_partitioning forms above; elsewhere, and for jax.export,
#   to XLA's own operations;
# - vmap: the mapped axis is folded into the kernel's images where the other operands are shared,
#   else into its channels where the kernel treats channels independently (all but the dense
#   convolution, whose other maps are XLA's batched convolution), so one call runs the map;
# - autodiff: the three depthwise kernels are bilinear, and each one's transposes are the other
#   two, being the partial derivatives of one trilinear form <forward(x, taps), g>: forward mode,
#   reverse mode and higher derivatives all run the kernels. The dense convolution's transposes
#   are XLA's patches with the 1x1 primitives. The fused (eval BatchNorm) kernels differentiate
#   as their unfused forms (`_unfused_jvp`); BatchNorm's kernels take XLA's tangents (`_portable_jvp`).


def _primitive(name: str, impl, portable, abstract_eval, batch_rule, multiple_results: bool = False):
    """The primitive `name` computed by `impl` on the CPU, by `portable` (the same function in
    XLA's own operations) elsewhere and in `jax.export`'s serialized code, which may run where these
    kernels are not built; `batch_rule(primitive)` is its vmap rule."""
    primitive = Primitive(f"flax_mobilenet_{name}")
    primitive.multiple_results = multiple_results
    primitive.def_impl(impl)
    primitive.def_abstract_eval(abstract_eval)
    native_rule = mlir.lower_fun(impl, multiple_results=multiple_results)
    portable_rule = mlir.lower_fun(portable, multiple_results=multiple_results)

    def cpu_rule(ctx, *args, **params):
        exporting = ctx.module_context.lowering_parameters.for_export
        return (portable_rule if exporting else native_rule)(ctx, *args, **params)

    mlir.register_lowering(primitive, portable_rule)
    mlir.register_lowering(primitive, cpu_rule, platform="cpu")
    batching.primitive_batchers[primitive] = batch_rule(primitive)
    # The lowering is custom_partitioning's, which needs the devices when it is lowered; jit gives
    # them only to the primitives in this set (custom_partitioning adds its own the same way). A
    # private set: where a jax lacks it, only a batch sharded over devices fails to lower.
    getattr(dispatch, "prim_requires_devices_during_lowering", set()).add(primitive)
    return primitive


def _mapped_size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _into_channels(args, dims, size):
    """Each operand with the mapped axis folded into its channels (the last axis, in every kernel)
    as channel v * C + c; an unmapped operand is repeated for each v."""
    folded = []
    for a, d in zip(args, dims):
        if d is None:
            a = jnp.broadcast_to(a[..., None, :], (*a.shape[:-1], size, a.shape[-1]))
        else:
            a = jnp.moveaxis(a, d, -2)
        folded.append(a.reshape(*a.shape[:-2], size * a.shape[-1]))
    return folded


def _out_of_channels(out, size):
    """The mapped axis back out of the channels of an output: (..., V * C) -> (..., V, C)."""
    return out.reshape(*out.shape[:-1], size, out.shape[-1] // size), out.ndim - 1


def _per_channel_batch_rule(primitive):
    def rule(args, dims, **params):
        size = _mapped_size(args, dims)
        outs = primitive.bind(*_into_channels(args, dims, size), **params)
        if not primitive.multiple_results:
            return _out_of_channels(outs, size)
        unfolded = [_out_of_channels(out, size) for out in outs]
        return [out for out, _ in unfolded], [dim for _, dim in unfolded]

    return rule


def _image_batch_rule(primitive, otherwise=None):
    """For a kernel whose output has its first operand's images: a map over the images alone
    (the other operands shared) folds into the batch, (V, N, ...) -> (V * N, ...); else
    `otherwise(primitive)`, by default a fold into the channels."""

    def rule(args, dims, **params):
        if any(d is not None for d in dims[1:]):
            return (otherwise or _per_channel_batch_rule)(primitive)(args, dims, **params)
        a = jnp.moveaxis(args[0], dims[0], 0)
        out = primitive.bind(a.reshape(-1, *a.shape[2:]), *args[1:], **params)
        return out.reshape(a.shape[0], -1, *out.shape[1:]), 0

    return rule


def _activation_aval(a, hw):
    return ShapedArray((a.shape[0], *hw, a.shape[3]), a.dtype)


# The portable forms: XLA's depthwise convolution (flax_mobilenet.depthwise, imported when first
# lowered: it imports this module) and its transposes.
def _xla_forward(x, taps, *, out_hw, stride, padding):
    from flax_mobilenet.depthwise import xla_depthwise_conv2d

    return xla_depthwise_conv2d(x, taps[:, :, None, :], stride, padding)


def _xla_input_grad(g, taps, *, in_hw, stride, padding):
    x = jax.ShapeDtypeStruct((g.shape[0], *in_hw, g.shape[3]), g.dtype)
    forward = functools.partial(_xla_forward, taps=taps, out_hw=g.shape[1:3], stride=stride, padding=padding)
    return jax.linear_transpose(forward, x)(g)[0]


def _xla_kernel_grad(x, g, *, k, stride, padding):
    taps = jax.ShapeDtypeStruct((k, k, x.shape[3]), x.dtype)
    forward = lambda taps: _xla_forward(x, taps, out_hw=g.shape[1:3], stride=stride, padding=padding)  # noqa: E731
    return jax.linear_transpose(forward, taps)(g)[0]


_forward_p = _primitive(
    "depthwise_forward",
    lambda x, taps, *, out_hw, stride, padding: _partitioned()["Forward"](x, taps, out_hw, stride, padding, ()),
    _xla_forward,
    lambda x, taps, *, out_hw, stride, padding: _activation_aval(x, out_hw),
    _image_batch_rule,
)
_input_grad_p = _primitive(
    "depthwise_input_grad",
    lambda g, taps, *, in_hw, stride, padding: _partitioned()["InputGrad"](g, taps, in_hw, stride, padding, ()),
    _xla_input_grad,
    lambda g, taps, *, in_hw, stride, padding: _activation_aval(g, in_hw),
    _image_batch_rule,
)
_kernel_grad_p = _primitive(
    "depthwise_kernel_grad",
    lambda x, g, *, k, stride, padding: _partitioned()["KernelGrad"](x, g, k, stride, padding),
    _xla_kernel_grad,
    lambda x, g, *, k, stride, padding: ShapedArray((k, k, x.shape[3]), x.dtype),
    _per_channel_batch_rule,
)


# The forward with eval-mode BatchNorm's multiply-add and its activation applied as each output is
# written. Inference only runs the fused kernel: its JVP (so every derivative, and the transposes)
# is the unfused form's, in which the forward is the primitive above.
def _unfused_affine(linear):
    """A fused kernel's function in separate operations: activation(linear(x, w) * mul + add)."""

    def apply(x, w, mul, add, *, activation, **params):
        from flax_mobilenet.layers import with_affine  # layers imports this module

        return with_affine(linear(x, w, **params), mul, add, activation)

    return apply


def _unfused_jvp(primitive, unfused):
    """The fused `primitive`'s JVP rule: `unfused`'s JVP (value and tangent), so that every
    derivative, and the transposes, run the unfused form's kernels."""
    ad.primitive_jvps[primitive] = lambda primals, tangents, **params: jax.jvp(
        functools.partial(unfused, **params), tuple(primals), tuple(map(ad.instantiate_zeros, tangents))
    )


_forward_affine_p = _primitive(
    "depthwise_forward_affine",
    lambda x, taps, mul, add, *, out_hw, stride, padding, activation: _partitioned()["ForwardAffine"](
        x, taps, mul, add, out_hw, stride, padding, (("activation", ACTIVATION_CODES[activation]),)
    ),
    _unfused_affine(_xla_forward),
    lambda x, taps, mul, add, *, out_hw, stride, padding, activation: _activation_aval(x, out_hw),
    _image_batch_rule,
)
_unfused_jvp(_forward_affine_p, _unfused_affine(_forward_p.bind))


def forward(x: jax.Array, taps: jax.Array, out_hw: tuple[int, int], stride: int, padding: int) -> jax.Array:
    """y[n, o, q, c] = sum_{i,j} x[n, s*o - p + i, s*q - p + j, c] * taps[i, j, c], zero outside x."""
    _check(x, taps)
    return _forward_p.bind(x, taps, out_hw=tuple(out_hw), stride=int(stride), padding=int(padding))


def forward_affine(x, taps, mul, add, out_hw: tuple[int, int], stride: int, padding: int, activation: str | None) -> jax.Array:
    """activation(forward(x, taps) * mul + add), per channel, in one pass: the depthwise layer with
    eval-mode BatchNorm (mul, add) and its activation (a key of ACTIVATION_CODES)."""
    _check(x, taps, mul, add)
    _check_activation(activation)
    params = dict(out_hw=tuple(out_hw), stride=int(stride), padding=int(padding), activation=activation)
    return _forward_affine_p.bind(x, taps, mul, add, **params)


def input_grad(g: jax.Array, taps: jax.Array, in_hw: tuple[int, int], stride: int, padding: int) -> jax.Array:
    """The gradient of `forward` with respect to x, for the cotangent g."""
    _check(g, taps)
    return _input_grad_p.bind(g, taps, in_hw=tuple(in_hw), stride=int(stride), padding=int(padding))


def kernel_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    """The gradient of `forward` with respect to taps (k, k, C), for the cotangent g."""
    _check(x, g)
    return _kernel_grad_p.bind(x, g, k=int(k), stride=int(stride), padding=int(padding))


# The transposes (cotangent `ct`; the operand being transposed is an undefined primal, of which
# only the shape is known).
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
# kernel on the CPU where the output is small (a long sum into few values: XLA's dot runs those
# at 30-70 GFLOP/s, bench/NOTES.md section 9); the input's is the product by w^T. The product
# itself is XLA's dot everywhere.
OUTER_NATIVE_MAX = 4096  # channels in x channels out, up to which the native kernel runs


def _xla_channel_product(x, w):
    return jnp.dot(x, w)


def _xla_pixel_outer(x, g):
    return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))


def _vmap_rule(portable):
    """vmap by the portable form's own rule (a batched dot): for maps the kernels have no use for."""
    return lambda primitive: lambda args, dims, **params: (jax.vmap(functools.partial(portable, **params), in_axes=dims)(*args), 0)


def _pixels_batch_rule(primitive):
    """vmap of the product: a map over x alone (w shared) folds into the pixels, (V, P, A) ->
    (V * P, A), so the transposes stay ours; else a batched dot."""

    def rule(args, dims, **params):
        if dims[1] is not None:
            return _vmap_rule(_xla_channel_product)(primitive)(args, dims, **params)
        x = jnp.moveaxis(args[0], dims[0], 0)
        out = primitive.bind(x.reshape(-1, x.shape[-1]), args[1], **params)
        return out.reshape(x.shape[0], -1, out.shape[-1]), 0

    return rule


def _pixel_outer_impl(x, g):
    native = jax.default_backend() == "cpu" and x.shape[1] * g.shape[1] <= OUTER_NATIVE_MAX and supports(x, g) and available()
    return _pixel_outer_partitioned()(x, g) if native else _xla_pixel_outer(x, g)


_channel_product_p = _primitive(
    "channel_product",
    _xla_channel_product,
    _xla_channel_product,
    lambda x, w: ShapedArray((x.shape[0], w.shape[1]), x.dtype),
    _pixels_batch_rule,
)
_pixel_outer_p = _primitive(
    "pixel_outer",
    _pixel_outer_impl,
    _xla_pixel_outer,
    lambda x, g: ShapedArray((x.shape[1], g.shape[1]), x.dtype),
    _vmap_rule(_xla_pixel_outer),
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


def _channels_aval(x):
    return ShapedArray(x.shape[-1:], x.dtype)


# The portable forms: XLA's reductions and elementwise passes (flax_mobilenet.layers, imported when
# first lowered).
def _xla_statistics(x):
    from flax_mobilenet.layers import _statistics_xla

    return _statistics_xla(x)


def _xla_backward_sums(g, x, mean, mul, bias, *, activation):
    from flax_mobilenet.layers import _backward_sums_from_input

    return _backward_sums_from_input(g, x, mean, mul, bias, activation)


def _xla_normalise(x, mean, mul, bias, *, activation):
    from flax_mobilenet.layers import _normalise

    return _normalise(x, mean, mul, bias, activation)


def _xla_backward_input(g, x, terms, *, activation):
    from flax_mobilenet.layers import _backward_input

    return _backward_input(g, x, terms, activation)


def _portable_jvp(primitive, portable):
    """The JVP rule: the kernel's value, the portable form's tangent (XLA's linear operations, which
    transpose: so reverse mode and higher derivatives work too)."""

    def rule(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        _, d_out = jax.jvp(functools.partial(portable, **params), tuple(primals), tuple(tangents))
        return primitive.bind(*primals, **params), (list(d_out) if primitive.multiple_results else d_out)

    ad.primitive_jvps[primitive] = rule


_statistics_p = _primitive(
    "batch_norm_statistics",
    lambda x: _statistics_partitioned()(x),
    _xla_statistics,
    lambda x: (_channels_aval(x), _channels_aval(x)),
    _per_channel_batch_rule,
    multiple_results=True,
)
_backward_sums_p = _primitive(
    "batch_norm_backward_sums",
    lambda g, x, mean, mul, bias, *, activation: _backward_sums_partitioned()(g, x, mean, mul, bias, activation),
    _xla_backward_sums,
    lambda g, x, mean, mul, bias, *, activation: (_channels_aval(x), _channels_aval(x)),
    _per_channel_batch_rule,
    multiple_results=True,
)
_normalise_p = _primitive(
    "batch_norm_normalise",
    lambda x, mean, mul, bias, *, activation: _rows_partitioned("BatchNormNormalise", "n h w c, c, c, c -> n h w c")(
        x, mean, mul, bias, activation
    ),
    _xla_normalise,
    lambda x, mean, mul, bias, *, activation: ShapedArray(x.shape, x.dtype),
    _per_channel_batch_rule,
)
_backward_input_p = _primitive(
    "batch_norm_backward_input",
    lambda g, x, terms, *, activation: _rows_partitioned("BatchNormBackwardInput", "n h w c, n h w c, t c -> n h w c")(
        g, x, terms, activation
    ),
    _xla_backward_input,
    lambda g, x, terms, *, activation: ShapedArray(x.shape, x.dtype),
    _per_channel_batch_rule,
)


_portable_jvp(_statistics_p, _xla_statistics)
_portable_jvp(_backward_sums_p, _xla_backward_sums)
_portable_jvp(_normalise_p, _xla_normalise)
_portable_jvp(_backward_input_p, _xla_backward_input)


def batch_norm_statistics(x) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over N, H and W of NHWC x, in one read of x (each run
    of 64 rows, in cache, read twice: the variance is two-pass within it; the runs are merged in
    double), where XLA's mean and centred square read x twice."""
    _check(x)
    return tuple(_statistics_p.bind(x))


# Training-mode BatchNorm's passes over the activations, after the statistics. The activation's
# mask in the backward is recomputed from the input x, as (x - mean) * mul + bias (mul = scale /
# std) in one multiply-add, the same expression as the forward's: the output y is never read back.


def batch_norm_normalise(x, mean, mul, bias, activation: str | None) -> jax.Array:
    """activation((x - mean) * mul + bias) per channel of NHWC x: training-mode BatchNorm's output
    (mul = scale / std), one read and one write."""
    _check(x, mean, mul, bias)
    _check_activation(activation)
    return _normalise_p.bind(x, mean, mul, bias, activation=activation)


def batch_norm_backward_sums(g, x, mean, mul, bias, activation: str | None) -> tuple[jax.Array, jax.Array]:
    """sum(g') and sum(g' * (x - mean)) per channel over N, H and W (NHWC operands of one dtype),
    g' being g where `activation` passes the gradient at the pre-activation (x - mean) * mul + bias
    (all of g for None): one read of g and x, where XLA's two reductions read g, y and x twice."""
    _check(g, x, mean, mul, bias)
    _check_activation(activation)
    return tuple(_backward_sums_p.bind(g, x, mean, mul, bias, activation=activation))


def batch_norm_backward_input(g, x, terms, activation: str | None) -> jax.Array:
    """Training-mode BatchNorm's input gradient (`flax_mobilenet.layers.batch_norm_train`), from the
    cotangent g, the input x and `terms` (8, C): mean, mul, bias, rstd, sum(g')/n, sum(g' xhat)/n,
    d_mean/n and 2 d_var/n, n the pixels per channel. One read of g and x, one write."""
    _check(g, x, terms)
    _check_activation(activation)
    return _backward_input_p.bind(g, x, terms, activation=activation)


# ----------------------------------------------------------------------------- dense convolution

# A convolution with groups 1 whose patch is short (the stem's 3x3 over 3 channels; a 1x1 layer),
# NHWC x times w (k, k, C, D), in the native kernel: the patches are gathered in registers, not
# written out as XLA's form does (layers.PatchConv). Eval-mode BatchNorm and its activation can be
# applied as it writes (`dense_conv_affine`), as the depthwise forward does. Its transposes are
# XLA's patches and our 1x1 primitives: the kernel's is `pixel_outer` of the patches and the
# cotangent (the native kernel where it is small), the input's the product by w^T, scattered
# back to the pixels by the patches' transpose.


# The most weights (k*k*C*D) for which `dense_conv` runs as fast as XLA's dot: it streams all of w
# for every 8 output pixels, which stays in cache up to about this (256 KiB in float32); XLA's dot
# blocks larger products better (a 1x1 layer of 1024 x 1024 channels: 11.0 ms against 7.9).
DENSE_NATIVE_MAX = 65536


def dense_pays(kernel_shape: tuple[int, ...]) -> bool:
    """Whether `dense_conv` runs a layer with this kernel (k, k, C, D) at least as fast as XLA's
    dot on this CPU: at most DENSE_NATIVE_MAX weights, and either k > 1 (XLA writes the patches
    out; the stem) or a build with 32 vector registers (AVX-512). With AVX2's 16, XLA's dot ran
    the 1x1 layers faster: 95-113 GFLOP/s against 80-102 (bench/NOTES.md section 14)."""
    return math.prod(kernel_shape) <= DENSE_NATIVE_MAX and (kernel_shape[0] > 1 or vector_registers() >= 32)


def _xla_dense(x, w, *, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def patches(x: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    """(N, Ho, Wo, k*k*C): what each output pixel of a k x k convolution sees, in the kernel's
    (i, j, c) order, zero in the padding (x itself for a 1x1 convolution)."""
    if (k, stride, padding) == (1, 1, 0):
        return x
    from flax_mobilenet.depthwise import padded_input, tap_window  # it imports this module

    xp, out_hw = padded_input(x, k, stride, padding)
    return jnp.concatenate([tap_window(xp, i, j, out_hw, stride) for i in range(k) for j in range(k)], axis=-1)


def _dense_linear(x, w, *, stride, padding):
    """The dense convolution as the primitive whose transposes suit it: a 1x1 layer's is
    `channel_product`, any other `dense_conv`'s."""
    if (w.shape[0], stride, padding) == (1, 1, 0):
        return channel_product(x.reshape(-1, x.shape[-1]), w[0, 0]).reshape(*x.shape[:-1], w.shape[-1])
    return _dense_p.bind(x, w, stride=stride, padding=padding)


def _dense_aval(x, w, stride, padding):
    k = w.shape[0]
    out_hw = tuple((size + 2 * padding - k) // stride + 1 for size in x.shape[1:3])
    return ShapedArray((x.shape[0], *out_hw, w.shape[3]), x.dtype)


def _dense_run(op, *operands, stride, padding, attrs=()):
    out_hw = _dense_aval(operands[0], operands[1], stride, padding).shape[1:3]
    return _partitioned()[op](*operands, out_hw, stride, padding, attrs)


_dense_p = _primitive(
    "dense_conv",
    lambda x, w, *, stride, padding: _dense_run("Dense", x, w, stride=stride, padding=padding),
    _xla_dense,
    lambda x, w, *, stride, padding: _dense_aval(x, w, stride, padding),
    functools.partial(_image_batch_rule, otherwise=_vmap_rule(_xla_dense)),
)


# The transposes (x or w is the undefined primal, known by its aval).
def _dense_input_transpose(ct, x, w, *, stride, padding):
    k, d = w.shape[0], w.shape[3]
    kkc = k * k * w.shape[2]
    g = channel_product(ct.reshape(-1, d), w.reshape(kkc, d).T).reshape(*ct.shape[:-1], kkc)
    x_aval = jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype)
    return jax.linear_transpose(functools.partial(patches, k=k, stride=stride, padding=padding), x_aval)(g)[0]


def _dense_kernel_transpose(ct, x, w, *, stride, padding):
    k, c, d = w.aval.shape[0], w.aval.shape[2], w.aval.shape[3]
    p = patches(x, k, stride, padding)
    return pixel_outer(p.reshape(-1, k * k * c), ct.reshape(-1, d)).reshape(k, k, c, d)


ad.defbilinear(_dense_p, _dense_input_transpose, _dense_kernel_transpose)


_dense_affine_p = _primitive(
    "dense_conv_affine",
    lambda x, w, mul, add, *, stride, padding, activation: _dense_run(
        "DenseAffine", x, w, mul, add, stride=stride, padding=padding, attrs=(("activation", ACTIVATION_CODES[activation]),)
    ),
    _unfused_affine(_xla_dense),
    lambda x, w, mul, add, *, stride, padding, activation: _dense_aval(x, w, stride, padding),
    functools.partial(_image_batch_rule, otherwise=_vmap_rule(_unfused_affine(_xla_dense))),
)
_unfused_jvp(_dense_affine_p, _unfused_affine(_dense_linear))


def dense_conv(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """y[n, o, q, :] = sum_{i,j,c} x[n, s*o - p + i, s*q - p + j, c] * w[i, j, c, :], zero outside x:
    NHWC x, w (k, k, C, D), groups 1, in the native kernel."""
    _check(x, w)
    return _dense_p.bind(x, w, stride=int(stride), padding=int(padding))


def dense_conv_affine(x, w, mul, add, stride: int, padding: int, activation: str | None) -> jax.Array:
    """activation(dense_conv(x, w) * mul + add), per output channel, in one pass: the layer with
    eval-mode BatchNorm (mul, add) and its activation (a key of ACTIVATION_CODES)."""
    _check(x, w, mul, add)
    _check_activation(activation)
    return _dense_affine_p.bind(x, w, mul, add, stride=int(stride), padding=int(padding), activation=activation)
