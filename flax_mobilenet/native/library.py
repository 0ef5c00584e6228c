"""The compiled library (kernels.cc beside this file): built, cached, loaded, and its handlers
registered with XLA and called.

It is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``) against the XLA
FFI headers that jaxlib ships, for this machine's processor, and kept in a cache
(``$FLAX_MOBILENET_CACHE``, else ``$XDG_CACHE_HOME/flax_mobilenet``, else
``~/.cache/flax_mobilenet``) under a name that hashes the source, the compiler command, jaxlib's
version and the processor's flags (`build_id`); later processes load it from there. Where it cannot
be built, `available()` is False and a warning says why, once.
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
OPS = ("DepthwiseForward", "DepthwiseForwardAffine", "DepthwiseInputGrad", "DepthwiseKernelGrad", "PointwiseKernelGrad", "DenseConv", "DenseConvAffine", "BatchNormStatistics", "BatchNormBackwardSums", "BatchNormNormalise", "BatchNormBackwardInput")
# The activations the kernels know, by code (kernels.cc: BatchNorm's training passes apply it and
# recompute its mask from the input, the depthwise forward and the dense convolution apply it after
# eval-mode BatchNorm).
ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}
# The oldest jaxlib the kernels were built and tested with (the FFI's CPU thread pool, the
# custom_partitioning sharding rules); older ones take the pure-JAX form.
MIN_JAXLIB = (0, 10)


def cache_dir() -> Path:
    """Where built kernels are kept."""
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


def build_id() -> str:
    """The name of this machine's build: a hash of what it is built from (the source, the compiler
    command, jaxlib's version, the processor's flags)."""
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_command(Path("out"))).encode(), jaxlib.__version__.encode(), _processor_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return f"kernels-{key.hexdigest()[:16]}"


def _build() -> Path:
    """The compiled library's path, building it into the cache first if it is not there."""
    import jaxlib

    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    if version < MIN_JAXLIB:
        raise RuntimeError(f"jaxlib {jaxlib.__version__} is older than {'.'.join(map(str, MIN_JAXLIB))}, the oldest tested")

    target = cache_dir() / f"{build_id()}.so"
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


def check(*operands) -> None:
    """A clear error where the kernels cannot run on these operands."""
    problem = _registered()
    if problem is not None:
        raise RuntimeError(f"the native kernels are not available: {problem}")
    if not supports(*operands):
        raise TypeError(f"native kernels take one dtype among {sorted(map(str, DTYPES))}, got {[str(a.dtype) for a in operands]}")


def check_activation(activation) -> None:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation {activation!r}: expected one of {list(ACTIVATION_CODES)}")


def kernel(op: str, operands, *shapes):
    """The ffi_call of handler `op` for the operands' dtype, with one output of each shape in that
    dtype."""
    check(*operands)
    dtype = np.dtype(operands[0].dtype)
    out = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes)
    return jax.ffi.ffi_call(_target(op, DTYPES[dtype]), out if len(out) > 1 else out[0])


def call(op: str, out_shape: tuple[int, ...], operands, **attrs) -> jax.Array:
    """Handler `op` on `operands`, one output of `out_shape`, its integer attributes `attrs`."""
    return kernel(op, operands, out_shape)(*operands, **{name: np.int64(value) for name, value in attrs.items()})
