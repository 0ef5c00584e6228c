"""MobileNetV1 and MobileNetV2 as `flax.nnx` modules, with the Linen models' variables and numerics.

    import optax
    from flax import nnx
    from flax_mobilenet import nnx as mobilenet_nnx

    model = mobilenet_nnx.MobileNetV2(num_classes=10, width_mult=0.5, rngs=nnx.Rngs(0))
    model.eval()                       # BatchNorm's running statistics, no dropout
    logits = model(images)             # NHWC float images
    model.train()                      # batch statistics (updated in place), dropout from rngs

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

Conversion to and from the Linen models' `{"params": ..., "batch_stats": ...}`, the format that
`parity.torch_to_flax` writes and the training checkpoints hold:

    model = mobilenet_nnx.MobileNetV2(num_classes=1000, variables=variables)   # from Linen
    variables = mobilenet_nnx.to_variables(model)                              # to Linen

The model holds one `nnx.Param` or `nnx.BatchStat` per Linen variable, at the Linen variable's path
(`model.features_1["depthwise"]["conv"]["kernel"]` is `variables["params"]["features_1"]
["depthwise"]["conv"]["kernel"]`), and its forward pass is the Linen model's `apply`, so the two
compute the same thing with the same PyTorch semantics (BatchNorm's momentum and unbiased running
variance, the fused kernels).

The mode follows NNX's convention: `model.train()` / `model.eval()`, or `nnx.view(model,
deterministic=..., use_running_average=...)`, or `model(x, train=...)` for one call. A new model is
in training mode, as `nnx.BatchNorm` and `nnx.Dropout` are. Training mode updates the running
statistics in place (the same `nnx.BatchStat` objects), so the module's structure never changes
under `nnx.jit`; and with dropout (MobileNetV2's default 0.2) it needs a random stream: the
`rngs` given at construction (its `dropout` stream, or its default one), or `rngs=` in the call.

Not `nnx.bridge.ToNNX`: it takes the mode as a call argument, so `train()`, `eval()` and
`nnx.view` would not reach the model, and it replaces its variables after each update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

import mobilenet_arch
from flax_mobilenet import models  # the module, not the package: the package may import this one

Dtype = Any

# The Linen model's collections, and the NNX variable type holding each.
VARIABLE_TYPES = {"params": nnx.Param, "batch_stats": nnx.BatchStat}

# Parameter shapes do not depend on the input size (the head pools globally); the smallest input
# that survives the five stride-2 layers keeps initialisation cheap.
_INIT_RESOLUTION = 32


class MobileNet(nnx.Module):
    """The network that `architecture` describes, holding its variables; `dtype` is the
    computation dtype, as in `flax_mobilenet.MobileNet`.

    `variables` (`{"params": ..., "batch_stats": ...}` of the Linen model) loads weights;
    without it the parameters are initialised as torchvision initialises them, from
    `rngs.params()`. `rngs` is also where training-mode dropout draws its keys.
    """

    def __init__(
        self,
        architecture: mobilenet_arch.Architecture,
        *,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
        variables: dict | None = None,
    ):
        self.architecture = architecture
        self.dtype = dtype
        self.deterministic = False
        self.use_running_average = False
        linen = self.linen_module()
        if variables is None:
            if rngs is None:
                raise ValueError(
                    "MobileNet needs rngs=nnx.Rngs(seed) to initialise its parameters, "
                    "or variables={'params': ..., 'batch_stats': ...} to load them"
                )
            variables = models.init_variables(linen, rngs.params(), _INIT_RESOLUTION)
        else:
            variables = _checked(variables, _expected_variables(linen))
        has_stream = rngs is not None and ("dropout" in rngs or "default" in rngs)
        self.rngs = rngs["dropout"].fork() if has_stream else nnx.data(None)
        for name, tree in _as_nnx_variables(variables).items():
            setattr(self, name, nnx.data(tree))

    def linen_module(self) -> models.MobileNet:
        """The Linen model computing this one's forward pass."""
        return models.MobileNet(self.architecture, self.dtype)

    def set_view(self, deterministic: bool | None = None, use_running_average: bool | None = None):
        """Used by `nnx.view` (in the form `nnx.view_info` reads). The model needs both equal.

        Args:
          deterministic: if True, no dropout.
          use_running_average: if True, BatchNorm uses its running statistics and leaves them.
        """
        if deterministic is not None:
            self.deterministic = deterministic
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(
        self,
        x: jax.Array,
        train: bool | None = None,
        *,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Logits for NHWC images `x`; `train` overrides the module's mode for this call, `rngs`
        its dropout stream."""
        train = self._training() if train is None else train
        linen = self.linen_module()
        variables = to_variables(self)
        if not train:
            return linen.apply(variables, x, train=False)
        logits, updates = linen.apply(
            variables, x, train=True, rngs=self._dropout_rngs(rngs), mutable=["batch_stats"]
        )
        nnx.update(self, updates["batch_stats"])
        return logits

    def _training(self) -> bool:
        if self.deterministic != self.use_running_average:
            raise ValueError(
                f"MobileNet runs BatchNorm and dropout in one mode, but deterministic={self.deterministic} "
                f"and use_running_average={self.use_running_average}; use model.train() or model.eval()"
            )
        return not self.use_running_average

    def _dropout_rngs(self, rngs) -> dict:
        """Linen's `rngs` for a training-mode call: a dropout key when the model has dropout."""
        if not any(layer.dropout for layer in self.architecture.head.layers):
            return {}
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
            raise ValueError(
                f"dropout {self.architecture.dropout} in training mode needs a random stream: pass "
                "rngs=nnx.Rngs(seed) when creating the model or to the call, or use model.eval()"
            )
        if isinstance(rngs, nnx.Rngs):
            rngs = rngs["dropout"]
        return {"dropout": rngs() if isinstance(rngs, nnx.RngStream) else rngs}


def to_variables(model: MobileNet) -> dict:
    """The model's variables as the Linen model's `{"params": ..., "batch_stats": ...}`."""
    return {
        collection: nnx.to_pure_dict(nnx.state(model, variable_type))
        for collection, variable_type in VARIABLE_TYPES.items()
    }


def MobileNetV1(*args, rngs: nnx.Rngs | None = None, variables: dict | None = None, **kwargs) -> MobileNet:
    """MobileNetV1; the arguments are `flax_mobilenet.MobileNetV1`'s (num_classes, width_mult,
    dropout, activation, dtype)."""
    return _from_linen(models.MobileNetV1(*args, **kwargs), rngs, variables)


def MobileNetV2(*args, rngs: nnx.Rngs | None = None, variables: dict | None = None, **kwargs) -> MobileNet:
    """MobileNetV2; the arguments are `flax_mobilenet.MobileNetV2`'s (num_classes, width_mult,
    dropout, dtype)."""
    return _from_linen(models.MobileNetV2(*args, **kwargs), rngs, variables)


def create_model(*args, rngs: nnx.Rngs | None = None, variables: dict | None = None, **kwargs) -> MobileNet:
    """The NNX model for `arch` ("v1" or "v2"); the arguments are `flax_mobilenet.create_model`'s
    (arch, width_mult, num_classes, dtype, and the architecture's keywords)."""
    return _from_linen(models.create_model(*args, **kwargs), rngs, variables)


def _from_linen(linen: models.MobileNet, rngs, variables) -> MobileNet:
    return MobileNet(linen.architecture, dtype=linen.dtype, rngs=rngs, variables=variables)


def _expected_variables(linen: models.MobileNet) -> dict:
    return jax.eval_shape(lambda key: models.init_variables(linen, key, _INIT_RESOLUTION), jax.random.key(0))


def _checked(variables: dict, expected: dict) -> dict:
    """`variables` as arrays of the expected dtypes, after checking that every expected variable
    is there with its shape and nothing else is."""
    given = traverse_util.flatten_dict(dict(variables), sep="/")
    wanted = traverse_util.flatten_dict(dict(expected), sep="/")
    missing, unexpected = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    if missing or unexpected:
        raise ValueError(
            f"variables do not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} and {len(unexpected)} in all); pass the Linen model's "
            "{'params': ..., 'batch_stats': ...} for the same arch and width_mult"
        )
    for path, want in wanted.items():
        if tuple(jnp.shape(given[path])) != want.shape:
            raise ValueError(
                f"variables do not fit the architecture: {path} has shape {tuple(jnp.shape(given[path]))}, "
                f"expected {want.shape}; pass variables for the same arch, width_mult and num_classes"
            )
    arrays = {path: jnp.asarray(given[path], want.dtype) for path, want in wanted.items()}
    return traverse_util.unflatten_dict(arrays, sep="/")


def _as_nnx_variables(variables: dict) -> dict:
    """The Linen collections merged into one tree of NNX variables, each at its Linen path."""
    flat = {}
    for collection, variable_type in VARIABLE_TYPES.items():
        for path, value in traverse_util.flatten_dict(variables[collection]).items():
            flat[path] = variable_type(value)
    return traverse_util.unflatten_dict(flat)
