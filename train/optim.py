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

AdamW is `torch.optim.AdamW`: the decay is decoupled (p -= lr * wd * p, beside the Adam step, not
added to the gradient), which is `optax.adamw`'s order: the learning rate multiplies the decay
term too, so a learning-rate schedule or a smaller backbone rate scales it as in torch.

Parameter groups (`train.param_groups.parameter_group`): a frozen parameter gets no update and carries no
optimizer state (`optax.set_to_zero` in an `optax.partition`); the backbone's learning rate is
`--backbone-lr-mult` times the head's (its hidden layers train as the classifier does). `--clip-grad-norm` scales the whole gradient as
`torch.nn.utils.clip_grad_norm_` does, before weight decay and the update rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mobilenet_arch
from train import param_groups


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


def depthwise_mask(params, architecture: mobilenet_arch.Architecture | str) -> dict:
    """True on the depthwise filters of `params`, False elsewhere (the V1 paper's 'little or no
    weight decay on the depthwise filters'). `architecture`: the model's, or an arch's name."""
    if isinstance(architecture, str):
        architecture = mobilenet_arch.architecture(architecture)
    depthwise = {
        (block.name, layer.role) for block in architecture.blocks for layer in block.layers if layer.depthwise
    }

    def is_depthwise(path, _):
        keys = tuple(getattr(k, "key", None) for k in path)
        return keys[:2] in depthwise and keys[2:] == ("conv", "kernel")

    return jax.tree_util.tree_map_with_path(is_depthwise, params)


FROZEN = "frozen"  # optax.partition's label of the parameters that do not train


def parameter_labels(config, params, architecture: mobilenet_arch.Architecture, frozen_blocks: int) -> dict:
    """Each parameter's group name (`train.param_groups.parameter_group`), FROZEN for a frozen one."""
    index = {block.name: i for i, block in enumerate(architecture.blocks)}
    depthwise = depthwise_mask(params, architecture)

    def label(path, is_depthwise):
        block = index.get(getattr(path[0], "key", None))  # None: a head layer (hidden_0, ..., classifier)
        group = param_groups.parameter_group(config, block, is_depthwise, frozen_blocks)
        return FROZEN if group is None else group.name

    return jax.tree_util.tree_map_with_path(label, depthwise)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_(parameters, max_norm)`: every gradient times
    min(1, max_norm / (global norm + 1e-6)). `optax.clip_by_global_norm` divides by the norm
    without the 1e-6, which rounds differently."""

    def clip(updates, params=None):
        scale = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)

    return optax.stateless(clip)


def _weight_decay(config, params, architecture) -> optax.GradientTransformation:
    if config.dw_weight_decay == config.weight_decay:
        return optax.add_decayed_weights(config.weight_decay)
    mask = depthwise_mask(params, architecture)
    others = jax.tree.map(lambda m: not m, mask)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=others),
        optax.add_decayed_weights(config.dw_weight_decay, mask=mask),
    )


def _update_rule(config, weight_decay: optax.GradientTransformation, lr) -> optax.GradientTransformation:
    """torch.optim's rule `config.optimizer` with this weight decay and learning rate."""
    if config.optimizer == "adamw":
        beta1, beta2 = param_groups.ADAMW_BETAS
        adam = optax.scale_by_adam(b1=beta1, b2=beta2, eps=param_groups.ADAMW_EPS)
        return optax.chain(adam, weight_decay, optax.scale_by_learning_rate(lr))
    if config.optimizer == "sgd":
        scale = optax.identity()
        nesterov = config.nesterov
    elif config.optimizer == "rmsprop":
        scale_by = optax.scale_by_stddev if config.rmsprop_centered else optax.scale_by_rms
        scale = scale_by(decay=config.rmsprop_decay, eps=config.rmsprop_eps, initial_scale=0.0, eps_in_sqrt=False)
        nesterov = False
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}: expected sgd, rmsprop or adamw")
    momentum = optax.trace(config.momentum, nesterov=nesterov) if config.momentum else optax.identity()
    return optax.chain(weight_decay, scale, momentum, optax.scale_by_learning_rate(lr))


def make_optimizer(
    config,
    params,
    steps_per_epoch: int,
    architecture: mobilenet_arch.Architecture | None = None,
    frozen_blocks: int = 0,
) -> optax.GradientTransformation:
    """The optax chain equal to `torch_step.make_optimizer(config, ...)` for the same config;
    `architecture` (default: `config.arch`'s) names the blocks, the first `frozen_blocks` of
    which get no update."""
    architecture = architecture or mobilenet_arch.architecture(config.arch)
    lr = schedule(config, steps_per_epoch)
    clip = [clip_grad_norm(config.clip_grad_norm)] if config.clip_grad_norm is not None else []
    if frozen_blocks == 0 and config.backbone_lr_mult == 1.0:
        return optax.chain(*clip, _update_rule(config, _weight_decay(config, params, architecture), lr))
    labels = parameter_labels(config, params, architecture, frozen_blocks)
    transforms = {FROZEN: optax.set_to_zero()}
    for group in param_groups.parameter_groups(config, architecture, frozen_blocks):
        # The group's rate is the schedule's times its factor, as torch's param group lr.
        group_lr = lr if group.lr_mult == 1.0 else (lambda step, m=group.lr_mult: m * lr(step))
        transforms[group.name] = _update_rule(config, optax.add_decayed_weights(group.weight_decay), group_lr)
    return optax.chain(*clip, optax.partition(transforms, labels))
