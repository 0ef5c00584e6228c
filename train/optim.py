"""Learning-rate schedules and optax chains with PyTorch's optimizer semantics.

Both frameworks step the same schedule every step: optax calls it with its update count, the
PyTorch path reads the same values (`schedule_values`) into its param groups, so update i uses
`schedule(i)` in both.

SGD is `torch.optim.SGD` (dampening 0): weight decay is added to the gradient before momentum
(coupled L2, not AdamW's decoupled decay), the momentum buffer starts at the first gradient,
and Nesterov uses g + momentum * buf.

RMSprop is `torch.optim.RMSprop`: the mean square starts at 0, eps is added *outside* the
square root, and momentum accumulates g / (sqrt(v) + eps) before the learning rate multiplies
it (so a learning-rate change acts on the whole buffer). `optax.rmsprop` differs in two ways:
eps goes inside the sqrt by default, and it applies the learning rate before the momentum
trace. TensorFlow's RMSProp, which the papers used, differs again: eps inside the sqrt and a
mean square that starts at 1. We follow PyTorch so that the two frameworks here train alike;
the presets pick an eps meant for this form (see train/config.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mobilenet_arch


def schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up to `config.lr`, then cosine to 0 over the rest of `config.epochs`, an
    exponential decay by `config.lr_decay_rate` per epoch, or a constant."""
    total = config.epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total)
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, decay_steps=max(total - warmup, 1))
    elif config.schedule == "exponential":
        main = optax.exponential_decay(config.lr, steps_per_epoch, config.lr_decay_rate, staircase=True)
    elif config.schedule == "constant":
        main = optax.constant_schedule(config.lr)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}: expected cosine, exponential or constant")
    if warmup == 0:
        return main
    # Starts at lr / warmup rather than 0, so that no step is wasted.
    ramp = optax.linear_schedule(config.lr / warmup, config.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def schedule_values(config, steps_per_epoch: int) -> np.ndarray:
    """schedule(i) for every step of the run, as the PyTorch path uses it."""
    steps = jnp.arange(config.epochs * steps_per_epoch)
    return np.asarray(jax.vmap(schedule(config, steps_per_epoch))(steps), np.float64)


def depthwise_mask(params, arch: str) -> dict:
    """True on the depthwise filters of `params`, False elsewhere (the V1 paper's 'little or no
    weight decay on the depthwise filters')."""
    architecture = mobilenet_arch.architecture(arch)
    depthwise = {
        (block.name, layer.role) for block in architecture.blocks for layer in block.layers if layer.depthwise
    }

    def is_depthwise(path, _):
        keys = tuple(getattr(k, "key", None) for k in path)
        return keys[:2] in depthwise and keys[2:] == ("conv", "kernel")

    return jax.tree_util.tree_map_with_path(is_depthwise, params)


def _weight_decay(config, params) -> optax.GradientTransformation:
    if config.dw_weight_decay == config.weight_decay:
        return optax.add_decayed_weights(config.weight_decay)
    mask = depthwise_mask(params, config.arch)
    others = jax.tree.map(lambda m: not m, mask)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=others),
        optax.add_decayed_weights(config.dw_weight_decay, mask=mask),
    )


def make_optimizer(config, params, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax chain equal to `torch_step.make_optimizer(config, ...)` for the same config."""
    lr = schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        scale = optax.identity()
        nesterov = config.nesterov
    elif config.optimizer == "rmsprop":
        scale_by = optax.scale_by_stddev if config.rmsprop_centered else optax.scale_by_rms
        scale = scale_by(decay=config.rmsprop_decay, eps=config.rmsprop_eps, initial_scale=0.0, eps_in_sqrt=False)
        nesterov = False
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}: expected sgd or rmsprop")
    momentum = optax.trace(config.momentum, nesterov=nesterov) if config.momentum else optax.identity()
    return optax.chain(_weight_decay(config, params), scale, momentum, optax.scale_by_learning_rate(lr))
