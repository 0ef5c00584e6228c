"""Random weights that leave no parameter unseen: what `parity.report` checks when given no
weights file, and what the parity tests convert.

    model = random_torch_model("v2", 1.0, seed=0)     # random weights, BN far from the identity
    x = random_batch(2, 224)                           # NHWC float32

Randomised BatchNorm matters: a freshly initialised BN (mean 0, variance 1, scale 1, bias 0) is
close to the identity in eval mode, and a converter that dropped the BN statistics or swapped
scale and bias would still pass. `randomize_batchnorm` makes every BN do something different.
"""

from __future__ import annotations

import numpy as np
import torch

import mobilenet_arch
from parity.models import Reference, torch_model


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
    classifier = model.get_submodule(mobilenet_arch.architecture(arch).torch_classifier)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 2)
        classifier.bias.copy_(torch.randn(classifier.bias.shape, generator=generator) * 0.01)
    return model.eval()


def random_batch(batch: int, resolution: int, seed: int = 0) -> np.ndarray:
    """NHWC float32 images, standard normal like normalised ImageNet input."""
    return np.random.default_rng(seed).standard_normal((batch, resolution, resolution, 3), dtype=np.float32)
