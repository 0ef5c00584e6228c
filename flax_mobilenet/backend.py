"""Which implementation each operation runs: chosen here, so that the layers read like the paper.

Three switches, each an environment variable read at trace time (a jitted function already compiled
keeps the implementation it was traced with):

- ``FLAX_MOBILENET_DEPTHWISE`` (auto, native, shifted, xla): the depthwise convolution
  (`flax_mobilenet.depthwise`);
- ``FLAX_MOBILENET_BATCHNORM`` (auto, native, xla): training-mode BatchNorm's reductions and passes;
- ``FLAX_MOBILENET_DENSE`` (auto, native, xla): in eval mode, the stem and the 1x1 convolutions with
  their BatchNorm and activation.

"auto" (the default) is the backend's entry in `AUTO`, else "xla": the native kernels on the CPU,
the only backend measured (`python -m bench`), and XLA's own operations (cuDNN, the TPU's
convolution unit) elsewhere. A native choice runs the kernels only on operands they take (float32
or float64) and where they are built (`native.available`); elsewhere a pure-JAX form runs. A fourth
variable, ``FLAX_MOBILENET_CACHE`` (`native.CACHE_ENV`), names the folder the kernels are built in.

A choice made here is the host's, but a program traced on the CPU may be lowered for another
platform (`lowering_platforms=("cuda",)`, an AOT compile or a `jax.export` for a GPU or TPU
server). So what is chosen for the CPU must still be right there: the native kernels are
primitives lowered per platform (XLA's own operations off the CPU), and a pure-JAX form that only
pays on the CPU goes through `on_cpu`, which picks it when lowering for the CPU and XLA's form
for every other platform.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

import jax

from flax_mobilenet import native

DEPTHWISE_ENV = "FLAX_MOBILENET_DEPTHWISE"
BATCH_NORM_ENV = "FLAX_MOBILENET_BATCHNORM"
DENSE_ENV = "FLAX_MOBILENET_DENSE"

# Each switch's choices, and what "auto" picks per backend.
OPTIONS = {DEPTHWISE_ENV: ("xla", "shifted", "native"), BATCH_NORM_ENV: ("native", "xla"), DENSE_ENV: ("native", "xla")}
AUTO = {DEPTHWISE_ENV: {"cpu": "native"}, BATCH_NORM_ENV: {"cpu": "native"}, DENSE_ENV: {"cpu": "native"}}


def choose(env_var: str, backend: str | None = None) -> str:
    """The implementation `env_var` names (one of its OPTIONS, or "auto": its AUTO entry for the
    backend, else "xla"), read now."""
    choice = os.environ.get(env_var, "auto").strip().lower() or "auto"
    if choice == "auto":
        return AUTO[env_var].get(backend or jax.default_backend(), "xla")
    if choice not in OPTIONS[env_var]:
        raise ValueError(f"{env_var}={choice!r}: expected one of auto, {', '.join(OPTIONS[env_var])}")
    return choice


@contextlib.contextmanager
def chosen(choices: Mapping[str, str | None]) -> Iterator[None]:
    """Within the block, each switch in `choices` (an environment variable above) makes the choice
    given (None: the one it had); after it, each is as before. A function traced inside keeps the
    choice, so the block need only hold while tracing (`jax.jit(...).lower`, `jax.export`)."""
    saved = {name: os.environ.get(name) for name in choices}
    try:
        for name, choice in choices.items():
            if choice is not None:
                os.environ[name] = choice
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def depthwise(backend: str | None = None) -> str:
    """The implementation `depthwise.depthwise_conv2d` uses: "xla", "shifted" or "native"."""
    return choose(DEPTHWISE_ENV, backend)


def batch_norm_reductions(backend: str | None = None) -> str:
    """Where training-mode BatchNorm computes its reductions (the batch statistics, the backward's
    two sums) and passes: "native" (one read of their operands each) or "xla" (two reads each).
    Both differentiate again: the native kernels' tangents are the portable forms'."""
    return choose(BATCH_NORM_ENV, backend)


def dense_convolutions(backend: str | None = None) -> str:
    """Where, in eval mode, the stem (`layers.PatchConv`) and the 1x1 convolutions run with their
    BatchNorm and activation: "native" (`native.dense_conv_affine`: no patches written, BatchNorm
    and the activation applied as it writes) or "xla" (XLA's dot, then BatchNorm as a pass of its
    own). Training is not affected."""
    return choose(DENSE_ENV, backend)


def on_cpu(cpu_form, elsewhere, *operands):
    """`cpu_form(*operands)` in a program lowered for the CPU, `elsewhere(*operands)` in one lowered
    for any other platform: decided when lowering, for the platform lowered for, not by the host
    that traces (`jax.lax.platform_dependent`; a program lowered for the CPU alone holds only
    `cpu_form`'s code)."""
    return jax.lax.platform_dependent(*operands, cpu=cpu_form, default=elsewhere)


def runs_native(chosen: str, *operands) -> bool:
    """Whether a native kernel runs on these operands: `chosen` is "native", the kernels take the
    operands as they come (one dtype they have) and are built on this machine."""
    return chosen == "native" and native.supports(*operands) and native.available()


def native_depthwise(*operands) -> bool:
    """Whether the native depthwise kernels run on these operands."""
    return runs_native(depthwise(), *operands)


def native_batch_norm(*operands) -> bool:
    """Whether BatchNorm's native kernels run on these operands, as they come (no conversion)."""
    return runs_native(batch_norm_reductions(), *operands)


def native_dense(x, kernel, *affine) -> bool:
    """Whether the native dense kernel runs this layer: chosen, one dtype it takes, and a kernel
    for which it pays on this CPU (`native.dense_pays`)."""
    return runs_native(dense_convolutions(), x, kernel, *affine) and native.dense_pays(kernel.shape)
