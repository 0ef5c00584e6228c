"""Each library's channel rule, as `mobilenet_arch` writes it, builds the library's own model:
every convolution's shape in order, the classifier's input, the residual connections and (timm)
the block positions. The libraries' models are built with random weights; nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest
import torch

import mobilenet_arch


def our_convolutions(arch: mobilenet_arch.Architecture) -> list[tuple[int, ...]]:
    """PyTorch shape (out, in / groups, k, k) of every convolution, in order."""
    return [
        (layer.out_channels, layer.in_channels // layer.groups, layer.kernel_size, layer.kernel_size)
        for block in arch.blocks
        for layer in block.layers
    ]


def torch_convolutions(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


# ---------------------------------------------------------------- timm

TIMM_MODELS = {
    # name: our description by timm's rule (width, and what timm's _gen_mobilenet_v* is given)
    "mobilenetv1_100": lambda: mobilenet_arch.mobilenet_v1(1.0),
    "mobilenetv1_100h": lambda: mobilenet_arch.mobilenet_v1(1.0, head=True),
    "mobilenetv1_125": lambda: mobilenet_arch.mobilenet_v1(1.25),
    "mobilenetv2_035": lambda: mobilenet_arch.mobilenet_v2(0.35),
    "mobilenetv2_050": lambda: mobilenet_arch.mobilenet_v2(0.5),
    "mobilenetv2_075": lambda: mobilenet_arch.mobilenet_v2(0.75),
    "mobilenetv2_100": lambda: mobilenet_arch.mobilenet_v2(1.0),
    "mobilenetv2_140": lambda: mobilenet_arch.mobilenet_v2(1.4),
    "mobilenetv2_110d": lambda: mobilenet_arch.mobilenet_v2(1.1, depth_mult=1.2, fix_stem_head=True),
    "mobilenetv2_120d": lambda: mobilenet_arch.mobilenet_v2(1.2, depth_mult=1.4, fix_stem_head=True),
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_are_described(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False)
    arch = TIMM_MODELS[name]()
    assert our_convolutions(arch) == torch_convolutions(model)
    assert model.classifier.in_features == arch.num_features
    blocks = [
        (int(s), int(r), module) for s, stage in model.blocks.named_children() for r, module in stage.named_children()
    ]
    ours = arch.blocks[1 : len(blocks) + 1]
    assert [(b.stage, b.repeat) for b in ours] == [(s, r) for s, r, _ in blocks]  # timm's blocks.{stage}.{repeat}
    assert [b.residual for b in ours] == [module.has_skip for _, _, module in blocks]


# ---------------------------------------------------------------- Hugging Face transformers


@pytest.mark.parametrize("depth_multiplier, min_depth", [(0.25, 8), (0.3, 8), (0.75, 8), (1.0, 8), (0.1, 8), (0.1, 2)])
def test_hugging_face_v1_configs_are_described(depth_multiplier, min_depth):
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV1Config(depth_multiplier=depth_multiplier, min_depth=min_depth, num_labels=10)
    model = transformers.MobileNetV1ForImageClassification(config)
    channels = mobilenet_arch.hf_v1_channels(depth_multiplier, min_depth)
    arch = mobilenet_arch.mobilenet_v1_from_channels(channels.stem, channels.outs, 10)
    assert our_convolutions(arch) == torch_convolutions(model)
    assert model.classifier.in_features == arch.num_features


@pytest.mark.parametrize(
    "settings",
    [
        dict(depth_multiplier=0.27),  # the stem rounds to 16 where torchvision's has 8
        dict(depth_multiplier=0.2),  # the first block keeps the stem's channels: no residual there
        dict(depth_multiplier=0.35),
        dict(depth_multiplier=0.5, finegrained_output=False),  # head 640
        dict(depth_multiplier=0.75, first_layer_is_expansion=False),
        dict(depth_multiplier=1.4),
        dict(depth_multiplier=0.5, depth_divisible_by=4, min_depth=4, expand_ratio=4.0),
    ],
    ids=repr,
)
def test_hugging_face_v2_configs_are_described(settings):
    transformers = pytest.importorskip("transformers")
    model = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(num_labels=10, **settings))
    arch = mobilenet_arch.mobilenet_v2_from_blocks(*mobilenet_arch.hf_v2_channels(**settings), 10, stem_residual=False)
    assert our_convolutions(arch) == torch_convolutions(model)
    assert model.classifier.in_features == arch.num_features
    assert not arch.blocks[1].residual  # Hugging Face's stem block has no residual connection
    assert [b.residual for b in arch.blocks[2:-1]] == [layer.use_residual for layer in model.mobilenet_v2.layer]


# ---------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    return pytest.importorskip("keras")


def keras_convolutions(model) -> list[tuple[int, ...]]:
    """Every convolution as PyTorch would shape it, in order, without V1's 1x1 classifier."""
    shapes = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":  # (k, k, C, 1)
            k, _, channels, multiplier = layer.kernel.shape
            shapes.append((channels * multiplier, 1, k, k))
        elif kind == "Conv2D" and layer.name != "conv_preds":  # (k, k, in, out)
            k, _, cin, cout = layer.kernel.shape
            shapes.append((cout, cin, k, k))
    return shapes


# Keras builds each model in ~10 s here: one width per model, where its rule differs from torchvision's.
def test_keras_mobilenet_is_described(keras):
    alpha = 0.3  # int(32 * 0.3) = 9 where torchvision's make_divisible gives 8
    model = keras.applications.MobileNet(
        weights=None, alpha=alpha, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )
    channels = mobilenet_arch.keras_v1_channels(alpha)
    arch = mobilenet_arch.mobilenet_v1_from_channels(channels.stem, channels.outs, 10)
    assert our_convolutions(arch) == keras_convolutions(model)
    assert model.get_layer("conv_preds").kernel.shape == (1, 1, arch.num_features, 10)


def test_keras_mobilenet_v2_is_described(keras):
    alpha = 0.42  # the 64-channel stage: 24 (int(26.88) = 26 -> 24) where torchvision's has 32
    model = keras.applications.MobileNetV2(
        weights=None, alpha=alpha, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )
    arch = mobilenet_arch.mobilenet_v2_from_blocks(*mobilenet_arch.keras_v2_channels(alpha), 10)
    assert our_convolutions(arch) == keras_convolutions(model)
    assert model.get_layer("predictions").kernel.shape == (arch.num_features, 10)
    # Keras adds a block's input where the channels and stride allow, the first block included.
    added = {layer.name.removesuffix("_add") for layer in model.layers if type(layer).__name__ == "Add"}
    names = ["expanded_conv"] + [f"block_{i}" for i in range(1, len(arch.blocks) - 2)]  # without stem and head
    assert [name in added for name in names] == [b.residual for b in arch.blocks[1:-1]]
