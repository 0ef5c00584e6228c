"""What both frameworks' optimizers share: the parameter groups (a learning-rate factor and a
weight decay each: torch.optim's param groups, optax.partition's labels) and torch.optim.AdamW's
constants. train/optim.py builds the optax chain from them, train/torch_step.py the torch.optim
optimizer; this module imports neither framework, so that each side imports only its own."""

from __future__ import annotations

import dataclasses

import mobilenet_arch

# torch.optim.AdamW's defaults, which --optimizer adamw uses in both frameworks.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class ParameterGroup:
    """Parameters that train with one learning-rate factor and one weight decay: a param group
    of torch.optim, a label of optax.partition."""

    lr_mult: float
    weight_decay: float

    @property
    def name(self) -> str:
        return f"lr x{self.lr_mult:g}, weight decay {self.weight_decay:g}"


def parameter_group(config, block: int | None, depthwise: bool, frozen_blocks: int = 0) -> ParameterGroup | None:
    """The group of a parameter of block `block` of features (None: the head, its hidden layers and
    the classifier alike; `depthwise`: a depthwise filter), or None when it is frozen. Both
    frameworks group their parameters by this."""
    if block is not None and block < frozen_blocks:
        return None
    lr_mult = 1.0 if block is None else config.backbone_lr_mult
    return ParameterGroup(lr_mult, config.dw_weight_decay if depthwise else config.weight_decay)


def parameter_groups(config, architecture: mobilenet_arch.Architecture, frozen_blocks: int = 0) -> list[ParameterGroup]:
    """The groups of the parameters of the model `architecture` describes, in the order of its
    parameters (convolution and BatchNorm of each layer, then the head's dense layers), each once."""
    groups = [
        parameter_group(config, index, depthwise, frozen_blocks)
        for index, block in enumerate(architecture.blocks)
        for layer in block.layers
        for depthwise in (layer.depthwise, False)
    ] + [parameter_group(config, None, False)]
    return list(dict.fromkeys(group for group in groups if group is not None))
