"""The two frameworks' MobileNets side by side: built from one description, run on one NHWC batch,
their outputs compared.

    torch_out = torch_logits(torch_model("v2", 1.0).eval(), x)          # x: NHWC float32 numpy
    flax_out = flax_logits(flax_model("v2", 1.0), variables, x)
    relative_l2(flax_out, torch_out)                                     # ~2e-6 in float32
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flax_mobilenet
import torch_ref

Reference = Literal["torch_ref", "torchvision"]
REFERENCES: tuple[str, ...] = ("torch_ref", "torchvision")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The largest relative L2 between two implementations' float32 logits that `convert --verify` and
# `export` accept: they differ by float32 rounding only (1e-7 to 5e-6 measured over the layouts' and
# the exports' tests); a wrong conversion is off by far more.
DEFAULT_TOLERANCE = 1e-5


def torch_model(
    arch: str, width_mult: float, num_classes: int = 1000, reference: Reference = "torch_ref", **kwargs
) -> torch.nn.Module:
    """torch_ref's model for `arch`, or (`reference="torchvision"`, V2 only) torchvision's own
    `mobilenet_v2`, initialised as usual."""
    if reference == "torchvision":
        if arch != "v2":
            raise ValueError(f"torchvision has no MobileNet{arch.upper()}: use reference='torch_ref'")
        import torchvision  # only here: torch_ref and the converter do without it

        return torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult, **kwargs)
    if reference == "torch_ref":
        return torch_ref.create_model(arch, width_mult, num_classes, **kwargs)
    raise ValueError(f"unknown reference {reference!r}: expected one of {', '.join(REFERENCES)}")


def flax_model(arch: str, width_mult: float, num_classes: int = 1000, dtype: str = "float32", **kwargs):
    return flax_mobilenet.create_model(arch, width_mult, num_classes, dtype=DTYPES[dtype], **kwargs)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """Logits of `model` (in whatever mode it is in) on an NHWC batch, without gradients."""
    with torch.no_grad():
        return model(to_nchw(x_nhwc)).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _eval_apply(model, variables: Any, x: jax.Array) -> jax.Array:
    # `model` is static: equal models (same architecture and dtype) share one compiled function.
    return model.apply(variables, x, train=False)


def flax_logits(model, variables: Any, x_nhwc: np.ndarray) -> np.ndarray:
    """Eval-mode logits of the Flax `model`, compiled once per model and input shape."""
    return np.asarray(_eval_apply(model, variables, x_nhwc))


def relative_l2(a: Any, b: Any) -> float:
    """||a - b|| / ||b||: the error of `a` relative to the reference `b` (float64 arithmetic)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
