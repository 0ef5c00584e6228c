"""PyTorch, timm and transformers heads as users hold them: the transfer-learning recipe's
`Dropout, Linear(256), ReLU, Linear(n)` (here 16 hidden units, any count reads alike) in a .pth
file and in the live module (a GELU there, which only the live module says), a user's module
holding torchvision's `features` under its own name beside its own head, timm after
`num_classes=0` / `reset_classifier` or with a Sequential classifier, transformers' base models.
Each is read to its library's logits; written back, each loads strictly into the model it came
from."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision

import mobilenet_arch
import parity
from parity import convert
from parity.layouts import LayoutError, same_architecture
from parity.layouts.registry import check_can_hold, layout
from parity.models import relative_l2
from parity.random_weights import randomize_batchnorm
from tests.cli_errors import assert_one_line_error

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

# float32 rounding through ~50 layers: up to 1e-5 relative L2 (tests/test_layouts.py); a wrong
# activation, a missing layer or swapped weights is off by 1e-2 or more.
TOLERANCE = 1e-5
X = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)  # any size reads the same weights
NCHW = torch.from_numpy(np.ascontiguousarray(X.transpose(0, 3, 1, 2)))
HIDDEN, CLASSES = 16, 4


def recipe_head(in_features: int, activation: torch.nn.Module) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(in_features, HIDDEN), activation, torch.nn.Linear(HIDDEN, CLASSES))


def recipe_model(seed: int, activation: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.25), seed)
    model.classifier = recipe_head(model.last_channel, activation or torch.nn.ReLU())
    return model.eval()


@pytest.fixture(scope="module")
def recipe():
    return recipe_model(0)


@pytest.fixture(scope="module")
def gelu_recipe():
    return recipe_model(1, torch.nn.GELU())


def logits(model, fn=None) -> np.ndarray:
    with torch.no_grad():
        return (fn or model)(NCHW).numpy()


def gap(ckpt, reference: np.ndarray) -> float:
    return relative_l2(np.asarray(ckpt.model.apply(ckpt.variables, X, train=False)), reference)


def load_noting(source, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = parity.load(source, **kw)
    return ckpt, " ".join(str(w.message) for w in caught)


# ---------------------------------------------------------------- torchvision


def test_the_recipes_head_is_read_from_a_pth_file(recipe, tmp_path):
    torch.save(recipe.state_dict(), tmp_path / "finetuned.pth")
    ckpt, notes = load_noting(tmp_path / "finetuned.pth")
    assert "ReLU is assumed between the head's layers" in notes
    assert [(l.units, l.activation) for l in ckpt.architecture.head.layers] == [(HIDDEN, "relu"), (CLASSES, None)]
    assert gap(ckpt, logits(recipe)) < TOLERANCE


def test_a_live_module_is_read_for_the_activations_and_dropouts_it_holds(gelu_recipe):
    ckpt, notes = load_noting(gelu_recipe)
    assert "assumed" not in notes
    assert ckpt.architecture.head.describe() == f"dropout 0.5 -> dense {HIDDEN} (gelu) -> dense {CLASSES}"
    assert gap(ckpt, logits(gelu_recipe)) < TOLERANCE
    # its state dict alone says no activation: ReLU is assumed, and the logits differ
    assert gap(parity.load(gelu_recipe.state_dict()), logits(gelu_recipe)) > 100 * TOLERANCE


def test_head_activation_names_what_a_state_dict_cannot_hold(gelu_recipe, tmp_path):
    assert gap(parity.load(gelu_recipe.state_dict(), head_activation="gelu"), logits(gelu_recipe)) < TOLERANCE
    torch.save(gelu_recipe.state_dict(), tmp_path / "gelu.pth")
    assert convert.main([str(tmp_path / "gelu.pth"), str(tmp_path / "gelu.msgpack"), "--head-activation", "gelu"]) == 0
    assert gap(parity.load(tmp_path / "gelu.msgpack"), logits(gelu_recipe)) < TOLERANCE


def test_export_takes_the_head_activation_too(gelu_recipe, tmp_path, capsys):
    from parity import export

    torch.save(gelu_recipe.state_dict(), tmp_path / "gelu.pth")
    assert export.main([str(tmp_path / "gelu.pth"), str(tmp_path / "gelu.stablehlo"), "--resolution", "64", "--head-activation", "gelu"]) == 0
    assert f"dense {HIDDEN} (gelu)" in capsys.readouterr().out


def test_head_activation_is_refused_where_the_source_says_its_own(recipe, tmp_path):
    parity.save(parity.load(recipe), tmp_path / "w.msgpack")
    with pytest.raises(parity.ConversionError, match="head_activation is for a PyTorch state dict"):
        parity.load(tmp_path / "w.msgpack", head_activation="gelu")


@pytest.mark.parametrize("source", ["recipe", "gelu_recipe"])
def test_the_recipe_written_back_loads_strictly_into_its_model(source, request, tmp_path):
    model = request.getfixturevalue(source)
    parity.save(parity.load(model), tmp_path / "back.pth")
    written = torch.load(tmp_path / "back.pth", weights_only=True)
    fresh = recipe_model(99, type(model.classifier[2])())
    fresh.load_state_dict(written, strict=True)
    # bit-exact: the same float32 values, only transposed and back
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert np.array_equal(logits(fresh), logits(model))


def test_a_single_layer_head_is_written_under_torchvisions_name(recipe, tmp_path):
    net = UsersNet(recipe.features, torch.nn.Linear(recipe.last_channel, 3)).eval()
    ckpt = parity.load(net.state_dict())
    assert gap(ckpt, logits(net)) < TOLERANCE
    parity.save(ckpt, tmp_path / "single.pth")
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "single.pth", weights_only=True), strict=True)
    assert relative_l2(logits(model.eval()), logits(net)) < TOLERANCE


class UsersNet(torch.nn.Module):
    """`self.backbone = mobilenet_v2().features` beside the user's own head: the state dict has
    `backbone.0.0.weight` (no `features.`) and `head.*`."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(self.backbone(x), 1).flatten(1))


def test_features_under_the_users_own_name_beside_its_own_head(recipe, tmp_path):
    net = UsersNet(recipe.features, torch.nn.Sequential(torch.nn.Linear(recipe.last_channel, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, 3))).eval()
    torch.save(net.state_dict(), tmp_path / "net.pth")
    ckpt, notes = load_noting(tmp_path / "net.pth", head_activation="silu")
    assert "'backbone.'" in notes and gap(ckpt, logits(net)) < TOLERANCE
    live, _ = load_noting(net)
    assert live.architecture.head.describe() == f"dense {HIDDEN} (silu) -> dense 3" and gap(live, logits(net)) < TOLERANCE


def test_a_live_softmax_is_the_checkpoints_output(recipe):
    model = recipe_model(5)
    model.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(model.last_channel, CLASSES), torch.nn.Softmax(dim=1))
    ckpt = parity.load(model.eval())
    assert ckpt.architecture.head.output == "softmax"
    assert relative_l2(np.asarray(ckpt.outputs(X)), logits(model)) < TOLERANCE


def test_a_head_module_the_head_cannot_hold_is_named(recipe):
    net = UsersNet(recipe.features, torch.nn.Sequential(torch.nn.Linear(recipe.last_channel, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, 3)))
    with pytest.raises(LayoutError, match=r"head.1: a LayerNorm in the head"):
        parity.load(net)


def test_headless_torchvision_gives_the_pooled_features(recipe):
    pooled = logits(recipe, lambda x: torch.nn.functional.adaptive_avg_pool2d(recipe.features(x), 1).flatten(1))
    ckpt, notes = load_noting(recipe.features.state_dict())
    assert ckpt.architecture.num_classes == 0 and "features Sequential is alone" in notes
    assert gap(ckpt, pooled) < TOLERANCE
    identity = recipe_model(0)
    identity.classifier = torch.nn.Identity()
    assert gap(parity.load(identity), logits(identity)) < TOLERANCE
    assert relative_l2(logits(identity), pooled) == 0  # the same network: Identity is the pooled features


def test_torchvision_and_timm_hold_hidden_heads_and_read_them_back(recipe):
    arch = parity.load(recipe).architecture
    for name in ("torchvision", "timm"):
        assert layout(name).cannot_hold(arch) is None, name
    with pytest.raises(LayoutError, match=r"a timm state dict holds no activations: the head's hidden layers"):
        mixed = mobilenet_arch.Head((mobilenet_arch.Dense(8, activation="relu"), mobilenet_arch.Dense(8, activation="gelu"), mobilenet_arch.Dense(3)))
        check_can_hold("timm", mobilenet_arch.with_head(arch, mixed))


@pytest.mark.parametrize("name, path", [("torchvision", "w.pth"), ("timm", "w.safetensors")])
def test_a_hidden_head_reads_back_as_the_same_architecture(gelu_recipe, name, path, tmp_path):
    ckpt = parity.load(gelu_recipe)
    parity.save(ckpt, tmp_path / path, layout=name)
    back = parity.load(tmp_path / path, head_activation="gelu")
    assert back.layout == name and same_architecture(back.architecture, ckpt.architecture)
    assert gap(back, logits(gelu_recipe)) < TOLERANCE


# ---------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(2)
    return randomize_batchnorm(timm.create_model("mobilenetv2_050", num_classes=7), 2).eval()


@pytest.mark.parametrize("classes", [0, 9])
def test_timm_after_reset_classifier(timm_model, classes):
    timm_model = copy.deepcopy(timm_model)
    timm_model.reset_classifier(classes)
    assert parity.load(timm_model).architecture.num_classes == classes
    assert gap(parity.load(timm_model), logits(timm_model)) < TOLERANCE


def test_timm_with_a_sequential_classifier_reads_and_writes_back_strictly(timm_model, tmp_path):
    timm_model = copy.deepcopy(timm_model)
    timm_model.classifier = torch.nn.Sequential(torch.nn.Linear(timm_model.num_features, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))
    ckpt = parity.load(timm_model)
    assert ckpt.layout == "timm" and ckpt.architecture.head.layers[0].activation == "tanh"
    assert gap(ckpt, logits(timm_model)) < TOLERANCE
    assert gap(parity.load(timm_model.state_dict(), head_activation="tanh"), logits(timm_model)) < TOLERANCE
    parity.save(ckpt, tmp_path / "t.safetensors", layout="timm")
    timm_model.load_state_dict(parity.load_torch_state_dict(tmp_path / "t.safetensors"), strict=True)


def test_convert_verifies_a_sequential_classifier_in_timm_itself(timm_model, tmp_path, capsys):
    timm_model = copy.deepcopy(timm_model)
    timm_model.classifier = torch.nn.Sequential(torch.nn.Linear(timm_model.num_features, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, CLASSES))
    torch.save(timm_model.state_dict(), tmp_path / "t.pth")
    args = [str(tmp_path / "t.pth"), str(tmp_path / "t.safetensors"), "--layout", "timm", "--verify", "--resolution", "64", "--head-activation", "silu"]
    assert convert.main(args) == 0
    out = capsys.readouterr().out
    assert "timm (source) vs Flax" in out and "timm on the written t.safetensors" in out, out
    assert gap(parity.load(tmp_path / "t.safetensors", head_activation="silu"), logits(timm_model)) < TOLERANCE


def test_a_single_layer_head_is_written_under_timms_name(tmp_path):
    one = recipe_model(3)
    one.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(one.last_channel, 5))
    parity.save(parity.load(one.eval()), tmp_path / "t.safetensors", layout="timm")
    assert {"classifier.weight", "classifier.bias"} <= set(parity.load_torch_state_dict(tmp_path / "t.safetensors"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mnasnet_100"])
def test_another_timm_network_is_named_in_one_line(name, tmp_path, capsys):
    torch.save(timm.create_model(name).state_dict(), tmp_path / f"{name}.pth")
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / f"{name}.pth"), str(tmp_path / "out.msgpack")])
    assert_one_line_error(capsys.readouterr().err, "EfficientNet-family network with 5x5 depthwise kernels", "not MobileNetV1/V2")
    assert not (tmp_path / "out.msgpack").exists()


# ---------------------------------------------------------------- transformers


def test_transformers_classification_model_gives_its_logits():
    model = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(depth_multiplier=0.35, num_labels=5))
    model = randomize_batchnorm(model, 4).eval()
    assert gap(parity.load(model), logits(model, lambda x: model(pixel_values=x).logits)) < TOLERANCE


def test_transformers_cannot_hold_a_hidden_head_and_says_what_can(recipe, tmp_path):
    arch = parity.load(recipe).architecture
    with pytest.raises(LayoutError) as e:
        check_can_hold("hf", arch)
    assert "single Linear classifier" in str(e.value) and "1 hidden layer" in str(e.value)
    assert "timm, torchvision or .msgpack" in str(e.value) and "\n" not in str(e.value)
    # A softmax output is no loss: transformers returns logits, as torchvision and timm do, and
    # so does the Flax model; an activation after the output layer is.
    softmax = mobilenet_arch.with_head(arch, mobilenet_arch.make_head(5, output="softmax"))
    with pytest.raises(LayoutError) as e:  # torchvision's first block, not the softmax
        check_can_hold("hf", softmax)
    assert "softmax" not in str(e.value) and "residual" in str(e.value)
    sigmoid = mobilenet_arch.with_head(arch, mobilenet_arch.Head((mobilenet_arch.Dense(5, activation="sigmoid"),)))
    with pytest.raises(LayoutError, match="would lose the sigmoid after the output layer"):
        check_can_hold("hf", sigmoid)
    with pytest.raises(LayoutError, match="1 hidden layer"):
        parity.save(parity.load(recipe), tmp_path / "hf_dir", layout="hf")
    assert not (tmp_path / "hf_dir").exists()
