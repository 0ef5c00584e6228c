"""The Flax model and torch_ref follow what the description says beyond torchvision's MobileNets:
TensorFlow SAME padding (one-sided at stride 2, different at odd and even sizes, per axis),
Keras's fixed padding, BatchNorm epsilon 1e-3, timm's depth multiplier with fixed stem and head,
V1's head convolution, Hugging Face's stem without residual, heads of several dense layers.

Each PyTorch model has random weights, BatchNorm statistics measured on a random batch and then
perturbed, and a random classifier bias (as in test_parity_outputs.py), so that padding on the
wrong side or the wrong epsilon changes the logits (see the negative controls below). Float32 on
the CPU, batch 2, small widths.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

import mobilenet_arch
import torch_ref
from flax_mobilenet.models import MobileNet
from parity.models import flax_logits, relative_l2, to_nchw, torch_logits
from parity.random_weights import randomize_batchnorm
from parity.weights import rules

# The bound, as for torchvision's layout (test_parity_outputs.py). Measured 4e-7 to 7e-6
# over these models, sizes and three seeds: float32 rounding in another summation order, as far
# from the float64 answer as PyTorch's own float32 logits are.
LOGITS_RTOL = 1e-5


def keras_v1_padding(role: str, stride: int) -> mobilenet_arch.Padding:
    # keras.applications.MobileNet: ZeroPadding2D(((0, 1), (0, 1))) before each stride-2 depthwise
    # layer whatever the input size; 'same' everywhere else.
    return ((0, 1), (0, 1)) if role == "depthwise" and stride == 2 else "same"


def hf_v1(padding: mobilenet_arch.PaddingRule = "same", bn_epsilon: float = 1e-3) -> mobilenet_arch.Architecture:
    # Hugging Face's Google checkpoints: tf_padding, layer_norm_eps 1e-3 (1001 labels in the originals).
    channels = mobilenet_arch.hf_v1_channels(0.25)
    return mobilenet_arch.mobilenet_v1_from_channels(
        channels.stem, channels.outs, 10, padding=padding, bn_epsilon=bn_epsilon
    )


def keras_v1(padding: mobilenet_arch.PaddingRule = keras_v1_padding) -> mobilenet_arch.Architecture:
    channels = mobilenet_arch.keras_v1_channels(0.25)
    return mobilenet_arch.mobilenet_v1_from_channels(channels.stem, channels.outs, 10, padding=padding, bn_epsilon=1e-3)


ARCHITECTURES = {
    "hf_v1": hf_v1(),
    "hf_v2": mobilenet_arch.mobilenet_v2_from_blocks(
        *mobilenet_arch.hf_v2_channels(0.35, first_layer_is_expansion=False),
        10, padding="same", bn_epsilon=1e-3, stem_residual=False, dropout=0.0,
    ),
    # timm's mobilenetv2_120d rule (depth 1.4, stem 32 and head 1280 kept) at a smaller width.
    "timm_v2_depth": mobilenet_arch.mobilenet_v2(0.5, 10, depth_mult=1.4, fix_stem_head=True),
    "timm_v1_head": mobilenet_arch.mobilenet_v1(0.25, 10, head=True),
    "keras_v1": keras_v1(),
    # Heads beyond torchvision's one layer: the transfer-learning recipe's (torchvision's Sequential
    # numbering), and one under names of the user's own module, with other activations.
    "recipe_v2": mobilenet_arch.mobilenet_v2(0.35, 10, 0.5, hidden=(32,)),
    "named_head_v1": mobilenet_arch.mobilenet_v1(0.25, classifier=mobilenet_arch.Head((
        mobilenet_arch.Dense(48, 0.1, "gelu", torch_name="head.0"),
        mobilenet_arch.Dense(24, 0.0, "tanh", torch_name="head.2"),
        mobilenet_arch.Dense(10, 0.0, None, torch_name="fc"),
    ))),
}

# 33 and 67 are odd (SAME pads (1, 1) at a stride-2 3x3 there, (0, 1) at even sizes), 64 is even,
# and 33x64 pads the two axes differently.
CASES = [
    ("hf_v1", (33, 33)), ("hf_v1", (64, 64)), ("hf_v1", (67, 67)), ("hf_v1", (33, 64)),
    ("hf_v2", (33, 33)), ("hf_v2", (64, 64)), ("hf_v2", (67, 67)),
    ("timm_v2_depth", (64, 64)), ("timm_v2_depth", (67, 67)),
    ("timm_v1_head", (64, 64)), ("timm_v1_head", (67, 67)),
    ("keras_v1", (67, 67)), ("keras_v1", (33, 64)),
    ("recipe_v2", (64, 64)), ("named_head_v1", (64, 64)),
]
SEED = 10


def random_reference(architecture: mobilenet_arch.Architecture, seed: int = SEED) -> torch.nn.Module:
    """torch_ref's model of `architecture` with random weights, BatchNorm and classifier bias."""
    torch.manual_seed(seed)
    model = torch_ref.MobileNet(architecture)
    randomize_batchnorm(model, seed + 1)
    for name in architecture.head.torch_names:  # zero at initialisation: a bias read from the wrong layer would pass
        bias = model.get_submodule(name).bias
        with torch.no_grad():
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed + 2)) * 0.01)
    return model.eval()


def flax_variables(model: torch.nn.Module, architecture: mobilenet_arch.Architecture) -> dict:
    """The converter's rules for torch_ref's (torchvision's) layout, applied to `model`."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    variables: dict = {}
    for rule in rules(architecture):
        node = variables
        for name in rule.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[rule.flax_path[-1]] = rule.to_flax(state[rule.key])
    return variables


def images(height: int, width: int, batch: int = 2, seed: int = SEED + 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(name):
        if name not in cache:
            architecture = ARCHITECTURES[name]
            model = random_reference(architecture)
            cache[name] = model, flax_variables(model, architecture)
        return cache[name]

    return get


@pytest.mark.parametrize("name, size", CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in CASES])
def test_eval_logits_match_torch_ref(name, size, references, record_property):
    architecture = ARCHITECTURES[name]
    model, variables = references(name)
    x = images(*size)
    error = relative_l2(flax_logits(MobileNet(architecture), variables, x), torch_logits(model, x))
    record_property("logits_rel_l2", error)
    assert error <= LOGITS_RTOL


# Negative controls: the cases above would fail if either framework padded symmetrically, used
# SAME where Keras pads (0, 1), or kept PyTorch's epsilon. With BatchNorm statistics measured on
# real activations some channels have a variance near 0, where 1e-3 and 1e-5 differ greatly.
@pytest.mark.parametrize(
    "name, misread, size",
    [
        ("hf_v1", hf_v1(padding="symmetric"), (64, 64)),
        ("hf_v1", hf_v1(padding="symmetric"), (33, 64)),
        ("hf_v1", hf_v1(bn_epsilon=mobilenet_arch.BN_EPSILON), (67, 67)),
        ("keras_v1", keras_v1(padding="same"), (67, 67)),
    ],
    ids=["symmetric-even", "symmetric-33x64", "epsilon", "keras-as-same"],
)
def test_the_wrong_padding_or_epsilon_is_far_outside_the_tolerance(name, misread, size, references):
    model, variables = references(name)
    x = images(*size)
    # Measured 0.4 to 1.6: over ten thousand times the tolerance.
    assert relative_l2(flax_logits(MobileNet(misread), variables, x), torch_logits(model, x)) > 100 * LOGITS_RTOL


def test_torch_ref_pads_as_hugging_faces_apply_tf_padding():
    pytest.importorskip("transformers")
    from transformers.models.mobilenet_v1.modeling_mobilenet_v1 import apply_tf_padding

    layer = ARCHITECTURES["hf_v1"].blocks[2].layers[0]  # depthwise 3x3, stride 2
    conv = torch_ref.models.PaddedConv2d(layer)
    x = torch.randn(1, layer.in_channels, 33, 64)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(apply_tf_padding(x, conv), conv.weight, None, 2, 0, 1, layer.groups)
        assert torch.equal(conv(x), expected)  # the same padding, then the same convolution


def test_train_mode_logits_match_with_same_padding_and_epsilon_1e3(references, record_property):
    """Training mode normalises with the batch's statistics and epsilon; the explicit padding is
    differentiated through. Judged against float64, as test_parity_outputs.py judges training mode."""
    architecture = ARCHITECTURES["hf_v2"]
    model, variables = references("hf_v2")
    model, exact = copy.deepcopy(model).train(), copy.deepcopy(model).double().train()
    x = images(64, 67, batch=4)
    flax_model = MobileNet(architecture)
    flax, _ = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    with torch.no_grad():
        torch_out = model(to_nchw(x)).numpy()
        exact_out = exact(to_nchw(x).double()).numpy()
    record_property("logits_rel_l2_flax_vs_float64", relative_l2(flax, exact_out))
    record_property("logits_rel_l2_torch_vs_float64", relative_l2(torch_out, exact_out))
    # Dividing by the batch's standard deviation amplifies rounding: Flax must be as close to the
    # float64 answer as PyTorch's float32 is, within 2x (another summation order) plus 1e-6.
    assert relative_l2(np.asarray(flax), exact_out) <= 2 * relative_l2(torch_out, exact_out) + 1e-6


def test_torch_ref_batchnorm_uses_the_description_epsilon():
    model = torch_ref.MobileNet(ARCHITECTURES["hf_v2"])
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}


def test_padded_layers_keep_torchvisions_keys():
    # Padding is behaviour, not weights: the state dict is the one the symmetric model has.
    same = torch_ref.MobileNet(ARCHITECTURES["hf_v1"]).state_dict()
    symmetric = torch_ref.MobileNet(hf_v1(padding="symmetric")).state_dict()
    assert {k: v.shape for k, v in same.items()} == {k: v.shape for k, v in symmetric.items()}
