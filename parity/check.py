"""Running the PyTorch and Flax models side by side, for the command-line tools and the tests.

    torch_model = random_torch_model("v2", 1.0, seed=0)        # random weights, BN far from identity
    x = random_batch(2, 224)                                     # NHWC float32
    torch_out, flax_out = run_both(torch_model, "v2", 1.0, x)
    relative_l2(flax_out, torch_out)                             # ~2e-6 in float32

Randomised BatchNorm matters: a freshly initialised BN (mean 0, variance 1, scale 1, bias 0) is
close to the identity in eval mode, and a converter that dropped the BN statistics or swapped
scale and bias would still pass. `randomize_batchnorm` makes every BN do something different.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Literal, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flax_mobilenet
import mobilenet_arch
import torch_ref
from parity.weights import torch_to_flax

Reference = Literal["torch_ref", "torchvision"]
REFERENCES: tuple[str, ...] = ("torch_ref", "torchvision")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm2d random affine parameters and random running statistics, in place.

    Drawing the statistics independently of the network (say mean ~ N(0, 0.2), var ~ U(0.5, 2))
    is not enough: with He-initialised convolutions the real activations shrink layer by layer
    while BN's shift stays, and after a few blocks the output no longer depends on the input
    (measured: logits equal across a batch to 1e-8), so a padding bug could not show. Instead the
    statistics are first measured on a random batch, as training would, then perturbed: every
    channel's variance scaled by U(0.5, 2) and its mean moved by N(0, 0.2) standard deviations.
    Scale ~ U(0.5, 1.5), bias ~ N(0, 0.2). `num_batches_tracked` is left at 0.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator)

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta, was_training = [bn.momentum for bn in norms], model.training
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(rand(bn.weight) + 0.5)
            bn.bias.copy_(randn(bn.bias) * 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model.train()(torch.randn((8, 3, 64, 64), generator=generator))
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
            bn.num_batches_tracked.zero_()
            bn.running_var.mul_(rand(bn.running_var) * 1.5 + 0.5)
            bn.running_mean.add_(randn(bn.running_mean) * 0.2 * bn.running_var.sqrt())
    return model.train(was_training)


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


def random_torch_model(
    arch: str,
    width_mult: float,
    num_classes: int = 1000,
    seed: int = 0,
    reference: Reference = "torch_ref",
    **kwargs,
) -> torch.nn.Module:
    """`torch_model(...)` in eval mode with random weights, random BN statistics and affine
    parameters, and a random classifier bias ~ N(0, 0.01), as small as the weights (torchvision
    initialises it to zero, which would hide a dropped bias; a larger one would swamp the logits).
    `kwargs` go to the model (`dropout=0.0`, say).
    """
    torch.manual_seed(seed)
    model = torch_model(arch, width_mult, num_classes, reference, **kwargs)
    randomize_batchnorm(model, seed + 1)
    classifier = model.classifier[1]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 2)
        classifier.bias.copy_(torch.randn(classifier.bias.shape, generator=generator) * 0.01)
    return model.eval()


def random_batch(batch: int, resolution: int, seed: int = 0) -> np.ndarray:
    """NHWC float32 images, standard normal like normalised ImageNet input."""
    return np.random.default_rng(seed).standard_normal((batch, resolution, resolution, 3), dtype=np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """Logits of `model` (in whatever mode it is in) on an NHWC batch, without gradients."""
    with torch.no_grad():
        return model(to_nchw(x_nhwc)).numpy()


def flax_model(arch: str, width_mult: float, num_classes: int = 1000, dtype: str = "float32", **kwargs):
    return flax_mobilenet.create_model(arch, width_mult, num_classes, dtype=DTYPES[dtype], **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _eval_apply(model, variables: Any, x: jax.Array) -> jax.Array:
    # `model` is static: equal models (same architecture and dtype) share one compiled function.
    return model.apply(variables, x, train=False)


def flax_logits(model, variables: Any, x_nhwc: np.ndarray) -> np.ndarray:
    """Eval-mode logits of the Flax `model`, compiled once per model and input shape."""
    return np.asarray(_eval_apply(model, variables, x_nhwc))


def run_both(
    torch_model: torch.nn.Module, arch: str, width_mult: float, x_nhwc: np.ndarray, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits of `torch_model` and of the Flax model holding its converted weights."""
    variables = torch_to_flax(torch_model.state_dict(), arch, width_mult)
    num_classes = variables["params"]["classifier"]["bias"].shape[0]
    model = flax_model(arch, width_mult, num_classes, dtype)
    return torch_logits(torch_model.eval(), x_nhwc), flax_logits(model, variables, x_nhwc)


def relative_l2(a: Any, b: Any) -> float:
    """||a - b|| / ||b||: the error of `a` relative to the reference `b` (float64 arithmetic)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Command-line helpers shared by parity.convert and parity.report.


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one `error: ...` line (exit 2) like every other
    bad input of the tools."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str) -> NoReturn:
    one_line = " ".join(message.split())  # library messages may span lines
    print(f"error: {one_line}", file=sys.stderr)
    raise SystemExit(2)


def architecture_or_fail(arch: str, width_mult: float) -> mobilenet_arch.Architecture:
    try:
        return mobilenet_arch.architecture(arch, width_mult)
    except ValueError as e:
        fail(str(e))
