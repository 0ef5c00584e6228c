"""CPU kernels of our own, called from XLA through `jax.ffi` (kernels.cc beside this file): the
depthwise convolution's forward, input gradient and kernel gradient, and BatchNorm's batch
statistics and the two sums of its backward.

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
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np

SOURCE = Path(__file__).with_name("kernels.cc")
CACHE_ENV = "FLAX_MOBILENET_CACHE"
# The dtypes with a kernel, and the suffix of their handlers' symbols in kernels.cc.
DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
# The handlers in kernels.cc, each defined for every dtype (symbol: op + suffix).
OPS = ("DepthwiseForward", "DepthwiseInputGrad", "DepthwiseKernelGrad", "BatchNormStatistics", "BatchNormBackwardSums")


def _cache_dir() -> Path:
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


def _build() -> Path:
    """The compiled library's path, building it into the cache first if it is not there."""
    import jaxlib

    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    if version < MIN_JAXLIB:
        raise RuntimeError(f"jaxlib {jaxlib.__version__} is older than {'.'.join(map(str, MIN_JAXLIB))}, the oldest tested")

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_command(Path("out"))).encode(), jaxlib.__version__.encode(), _processor_flags().encode()):
        key.update(part)
        key.update(b"\0")
    target = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
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
def _registered() -> str | None:
    """Builds, loads and registers the handlers once per process; the reason if it could not."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except Exception as error:  # noqa: BLE001  any failure to build or load means the pure-JAX form
        return f"{type(error).__name__}: {error}" if not isinstance(error, RuntimeError) else str(error)
    for suffix in DTYPES.values():
        for op in OPS:
            jax.ffi.register_ffi_target(_target(op, suffix), jax.ffi.pycapsule(getattr(library, f"{op}{suffix}")), platform="cpu")
    return None


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


def _kernel(op: str, operands, *shapes):
    """The ffi_call of handler `op` for the operands' dtype, with one output of each shape in that
    dtype; a clear error where the kernels cannot run."""
    problem = _registered()
    if problem is not None:
        raise RuntimeError(f"the native kernels are not available: {problem}")
    if not supports(*operands):
        raise TypeError(f"native kernels take one dtype among {sorted(map(str, DTYPES))}, got {[str(a.dtype) for a in operands]}")
    dtype = np.dtype(operands[0].dtype)
    out = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes)
    return jax.ffi.ffi_call(_target(op, DTYPES[dtype]), out if len(out) > 1 else out[0], vmap_method="sequential")


def _call(op: str, out_shape: tuple[int, ...], operands, stride: int, padding: int) -> jax.Array:
    return _kernel(op, operands, out_shape)(*operands, stride=np.int64(stride), padding=np.int64(padding))


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


def _batch_parallel(op: str, sharding_rule: str):
    """The kernel `op`, whose output has the batch of its first operand, split over images."""
    from jax.experimental.custom_partitioning import custom_partitioning

    def run(a, b, out_hw, stride, padding):
        return _call(op, (a.shape[0], *out_hw, a.shape[3]), (a, b), stride, padding)

    def partition(out_hw, stride, padding, mesh, arg_shapes, result_shape):
        images = _per_image(arg_shapes[0].sharding, mesh)
        return mesh, lambda a, b: run(a, b, out_hw, stride, padding), images, (images, _replicated(mesh))

    def infer(out_hw, stride, padding, mesh, arg_shapes, result_shape):
        return _per_image(arg_shapes[0].sharding, mesh)

    fn = custom_partitioning(run, static_argnums=(2, 3, 4))
    spatial = tuple(sharding_rule.replace(",", " ").replace("->", " ").split())
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                     need_replication_factors=tuple(f for f in spatial if f not in ("n", "c")))  # fmt: skip
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
def _partitioned():
    # Made on first use, so that importing the package never depends on this API's version.
    return {
        "Forward": _batch_parallel("DepthwiseForward", "n h w c, i j c -> n o q c"),
        "InputGrad": _batch_parallel("DepthwiseInputGrad", "n o q c, i j c -> n h w c"),
        "KernelGrad": _kernel_grad_partitioned(),
    }


def forward(x: jax.Array, taps: jax.Array, out_hw: tuple[int, int], stride: int, padding: int) -> jax.Array:
    """y[n, o, q, c] = sum_{i,j} x[n, s*o - p + i, s*q - p + j, c] * taps[i, j, c], zero outside x."""
    return _partitioned()["Forward"](x, taps, tuple(out_hw), stride, padding)


def input_grad(g: jax.Array, taps: jax.Array, in_hw: tuple[int, int], stride: int, padding: int) -> jax.Array:
    """The gradient of `forward` with respect to x, for the cotangent g."""
    return _partitioned()["InputGrad"](g, taps, tuple(in_hw), stride, padding)


def kernel_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    """The gradient of `forward` with respect to taps (k, k, C), for the cotangent g."""
    return _partitioned()["KernelGrad"](x, g, k, stride, padding)


# ----------------------------------------------------------------------------- BatchNorm

# The activations BatchNorm's backward reads its mask off (kernels.cc, BackwardSums).
ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}


def _backward_sums_run(g, y, x, mean, activation):
    channels = x.shape[-1:]
    call = _kernel("BatchNormBackwardSums", (g, y, x, mean), channels, channels)
    return call(g, y, x, mean, activation=np.int64(ACTIVATION_CODES[activation]))


@functools.cache
def _backward_sums_partitioned():
    from jax.experimental.custom_partitioning import custom_partitioning

    def partition(activation, mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes[0].sharding)
        images = _per_image(arg_shapes[0].sharding, mesh)

        def lower(g, y, x, mean):
            sums = _backward_sums_run(g, y, x, mean, activation)
            return sums if axes is None else tuple(jax.lax.psum(part, axes) for part in sums)

        replicated = _replicated(mesh)
        return mesh, lower, (replicated, replicated), (images, images, images, replicated)

    def infer(activation, mesh, arg_shapes, result_shape):
        return (_replicated(mesh), _replicated(mesh))

    fn = custom_partitioning(_backward_sums_run, static_argnums=(4,))
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule="n h w c, n h w c, n h w c, c -> c, c",
                     reduction_factors=("n", "h", "w"))  # fmt: skip
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


def batch_norm_statistics(x) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over N, H and W of NHWC x, in one read of x (each run
    of 64 rows, in cache, read twice: the variance is two-pass within it; the runs are merged in
    double), where XLA's mean and centred square read x twice."""
    return _statistics_partitioned()(x)


def batch_norm_backward_sums(g, y, x, mean, activation: str | None) -> tuple[jax.Array, jax.Array]:
    """sum(g') and sum(g' * (x - mean)) per channel over N, H and W (NHWC operands of one dtype),
    g' being g where `activation`'s output y passes the gradient (all of g for None): one read of
    g, y and x, where XLA's two reductions read them twice."""
    return _backward_sums_partitioned()(g, y, x, mean, activation)
