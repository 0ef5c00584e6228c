"""MobileNetV1 and MobileNetV2 as `flax.linen` modules, NHWC, built from `mobilenet_arch`.

    model = MobileNetV2(num_classes=1000, width_mult=1.0)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])

Each block sows its output into the `intermediates` collection as `{block_name: {"output": (y,)}}`
(`mutable=["intermediates"]` returns them), which `parity.report` compares against PyTorch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

import mobilenet_arch
from flax_mobilenet.layers import BatchNorm, DepthwiseConv, PatchConv, PointwiseConv, classifier_init

Dtype = Any

DENSE_ACTIVATIONS = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch.nn.GELU's default, the exact erf form
    "silu": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
}
assert set(DENSE_ACTIVATIONS) == set(mobilenet_arch.DENSE_ACTIVATIONS)

class ConvBN(nn.Module):
    """Convolution (no bias), BatchNorm, and the activation when the layer has one."""

    layer: mobilenet_arch.ConvBN
    activation: str
    dtype: Dtype
    epsilon: float = mobilenet_arch.BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layer = self.layer
        padding = (layer.kernel_size - 1) // 2
        (top, bottom), (left, right) = layer.pads(x.shape[1], x.shape[2])
        if (top, bottom, left, right) != (padding,) * 4:
            # TensorFlow's SAME at stride 2 or Keras's fixed padding is one-sided: pad explicitly,
            # then the same convolution (and so the same variables) without padding of its own.
            x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
            padding = 0
        if layer.depthwise:
            conv = DepthwiseConv(layer.kernel_size, layer.stride, padding, dtype=self.dtype, name="conv")
        elif layer.kernel_size == 1 and layer.stride == 1 and layer.groups == 1:
            conv = PointwiseConv(layer.out_channels, dtype=self.dtype, name="conv")
        elif layer.groups == 1:
            conv = PatchConv(layer.out_channels, layer.kernel_size, layer.stride, padding, dtype=self.dtype, name="conv")
        else:
            raise NotImplementedError(f"{layer}: a grouped convolution that is not depthwise")
        activation = self.activation if layer.activation else None
        bn = BatchNorm(epsilon=self.epsilon, dtype=self.dtype, activation=activation, name="bn")
        if not train and not self.is_initializing():
            # Eval: BatchNorm's multiply-add and the activation as the convolution's epilogue.
            return conv(x, bn.eval_affine(), activation)
        return bn(conv(x), train)


class Block(nn.Module):
    """A stem or head ConvBN, a depthwise-separable block (V1) or an inverted residual (V2)."""

    block: mobilenet_arch.Block
    activation: str
    dtype: Dtype
    epsilon: float = mobilenet_arch.BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = x
        for layer in self.block.layers:
            y = ConvBN(layer, self.activation, self.dtype, self.epsilon, name=layer.role)(y, train)
        y = x + y if self.block.residual else y
        self.sow("intermediates", "output", y)
        return y


class MobileNet(nn.Module):
    """The network that `architecture` describes; `dtype` is the computation dtype (parameters and
    BatchNorm statistics stay float32). Logits are returned in float32 (float64 for a float64 model)."""

    architecture: mobilenet_arch.Architecture
    dtype: Dtype = jnp.float32
    # The first `frozen_blocks` blocks are a frozen backbone: they run BatchNorm in inference mode
    # even in training, so that its statistics stay as they are (Keras's `trainable=False`), and
    # pass no gradient back, since nothing before them trains.
    frozen_blocks: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        arch = self.architecture
        x = x.astype(self.dtype)
        for index, block in enumerate(arch.blocks):
            x = Block(block, arch.activation, self.dtype, arch.bn_epsilon, name=block.name)(x, train and index >= self.frozen_blocks)
            if index + 1 == self.frozen_blocks:
                x = jax.lax.stop_gradient(x)
        x = x.mean(axis=(1, 2))
        # The head: no layers in a feature extractor (the pooled features are returned). The
        # output activation (Keras's softmax) is not applied: the model returns logits, as the
        # losses need; `parity` applies it where it compares with a source that returns it.
        for layer, name in zip(arch.head.layers, arch.head.flax_names):
            x = nn.Dropout(layer.dropout, deterministic=not train)(x)
            x = nn.Dense(layer.units, dtype=self.dtype, kernel_init=classifier_init, name=name)(x)
            if layer.activation:
                x = DENSE_ACTIVATIONS[layer.activation](x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def MobileNetV1(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    dropout: float = 0.0,
    activation: str = "relu6",
    dtype: Dtype = jnp.float32,
    **kwargs,
) -> MobileNet:
    """MobileNetV1 (Howard et al. 2017). ReLU6 by default, as TensorFlow's reference and timm's
    weights use; `activation="relu"` is the paper's text. Any input size works (the resolution
    multiplier). `kwargs` are `mobilenet_arch.mobilenet_v1`'s (head, padding, bn_epsilon, ...)."""
    return MobileNet(mobilenet_arch.mobilenet_v1(width_mult, num_classes, dropout, activation, **kwargs), dtype)


def MobileNetV2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    dropout: float = mobilenet_arch.V2_DROPOUT,
    dtype: Dtype = jnp.float32,
    **kwargs,
) -> MobileNet:
    """MobileNetV2 (Sandler et al. 2018), layer for layer torchvision's `mobilenet_v2`. `kwargs` are
    `mobilenet_arch.mobilenet_v2`'s (depth_mult, fix_stem_head, padding, bn_epsilon)."""
    return MobileNet(mobilenet_arch.mobilenet_v2(width_mult, num_classes, dropout, **kwargs), dtype)


def create_model(arch: str, width_mult: float = 1.0, num_classes: int = 1000, dtype: Dtype = jnp.float32, **kwargs):
    """The Flax model for `arch` ("v1" or "v2")."""
    return MobileNet(mobilenet_arch.architecture(arch, width_mult, num_classes, **kwargs), dtype)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: MobileNet, key: jax.Array, resolution: int):
    return model.init(key, jnp.zeros((1, resolution, resolution, 3), jnp.float32), train=False)


def init_variables(model: MobileNet, key: jax.Array, resolution: int = 224) -> dict:
    """`{"params": ..., "batch_stats": ...}` for `model`, initialised as torchvision initialises."""
    return dict(_init(model, key, resolution))
