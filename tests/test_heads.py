"""The head as data (`mobilenet_arch.Head`): what it says, and that the Flax models (Linen and
NNX) and torch_ref build it with the same parameters and names as the libraries that hold it.

Whether the two frameworks compute the same logits with such heads is test_arch_parity.py's
`recipe_v2` and `named_head_v1`; reading heads from each library's checkpoints is the layouts'
tests'.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import flax_mobilenet
import mobilenet_arch
import parity
import torch_ref
from flax_mobilenet import nnx as mobilenet_nnx
from flax_mobilenet.summary import flax_parameter_count
from parity.layouts import flax as flax_layout

RECIPE = dict(num_classes=4, dropout=0.5, hidden=(256,))


def recipe_torchvision(width: float = 1.0) -> torch.nn.Module:
    """The transfer-learning recipe, as its users write it."""
    model = torchvision.models.mobilenet_v2(width_mult=width)
    in_features = model.classifier[1].in_features
    model.classifier = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(in_features, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    return model


def test_torchvisions_one_layer_and_the_recipes_two_are_numbered_as_torchvision_numbers_them():
    assert mobilenet_arch.mobilenet_v2().head.torch_names == ("classifier.1",)
    recipe = mobilenet_arch.mobilenet_v2(**RECIPE)
    assert recipe.head.torch_names == ("classifier.1", "classifier.3")
    assert recipe.head.flax_names == ("hidden_0", "classifier")
    assert recipe.num_classes == 4 and recipe.dropout == 0.5
    assert mobilenet_arch.describe(recipe).startswith("MobileNetV2 width 1, head dropout 0.5 -> dense 256 (relu) -> dense 4,")


def test_torch_ref_with_the_recipes_head_has_the_recipes_state_dict():
    ours = torch_ref.MobileNetV2(**RECIPE).state_dict()
    theirs = recipe_torchvision().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    torch_ref.MobileNetV2(**RECIPE).load_state_dict(theirs, strict=True)


def test_a_head_under_its_own_names_is_built_there():
    head = mobilenet_arch.Head((
        mobilenet_arch.Dense(64, 0.2, "gelu", torch_name="head.0"),
        mobilenet_arch.Dense(5, 0.0, None, torch_name="fc"),
    ))
    model = torch_ref.MobileNetV2(width_mult=0.35, classifier=head)
    keys = [k for k in model.state_dict() if not k.startswith("features.")]
    assert keys == ["head.0.weight", "head.0.bias", "fc.weight", "fc.bias"]
    assert model.head.get_submodule("0").out_features == 64


def test_parameter_count_includes_every_dense_layer():
    arch = mobilenet_arch.mobilenet_v2(0.5, **RECIPE)
    model = torch_ref.MobileNet(arch)
    assert mobilenet_arch.parameter_count(arch) == sum(p.numel() for p in model.parameters())
    assert mobilenet_arch.parameter_count(arch) == flax_parameter_count(arch, 64)


def test_a_head_without_output_layer_or_with_bad_values_is_refused():
    with pytest.raises(ValueError, match="need an output layer"):
        mobilenet_arch.mobilenet_v2(num_classes=0, hidden=(256,))
    with pytest.raises(ValueError, match="activation must be one of"):
        mobilenet_arch.mobilenet_v2(hidden=(256,), hidden_activation="swish2")
    with pytest.raises(ValueError, match="output must be one of"):
        mobilenet_arch.mobilenet_v2(output="sigmoid")


def test_with_classes_replaces_only_the_output_layer():
    arch = mobilenet_arch.mobilenet_v2(**RECIPE)
    ten = mobilenet_arch.with_classes(arch, 10)
    assert ten.head.hidden == arch.head.hidden and ten.num_classes == 10
    assert mobilenet_arch.with_classes(arch, 0).head.layers == ()
    assert mobilenet_arch.with_dropout(arch, 0.1).head.layers[0].dropout == 0.1


def test_nnx_with_a_hidden_layer_gives_the_linen_logits():
    linen = flax_mobilenet.MobileNetV2(num_classes=4, width_mult=0.35, hidden=(32,), hidden_activation="silu")
    variables = flax_mobilenet.init_variables(linen, jax.random.key(0), 32)
    # A bias of zero would let a swapped or missing hidden layer pass.
    variables["params"]["hidden_0"]["bias"] = jax.random.normal(jax.random.key(1), (32,))
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    model = mobilenet_nnx.MobileNetV2(num_classes=4, width_mult=0.35, hidden=(32,), hidden_activation="silu", variables=variables)
    model.eval()
    # The same computation in the same order: equal to float32 rounding of one XLA compile against another.
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(linen.apply(variables, x)), rtol=1e-6, atol=1e-6)
    assert isinstance(model, nnx.Module)


def test_a_description_written_before_heads_were_data_still_reads():
    arch = mobilenet_arch.mobilenet_v2(0.35, 7, 0.3)
    old = flax_layout.architecture_to_json(arch)
    del old["head"]
    old.update(num_classes=7, dropout=0.3, torch_classifier="classifier.1", flax_classifier="classifier")
    assert flax_layout.architecture_from_json(json.loads(json.dumps(old))) == arch
    assert flax_layout.architecture_from_json(json.loads(json.dumps(flax_layout.architecture_to_json(arch)))) == arch


def test_with_classes_keeps_the_names_the_source_gave_the_head():
    # A user's head.0 / head.2 fine-tuned to other classes is still written where their model has it.
    head = mobilenet_arch.Head((mobilenet_arch.Dense(64, 0.2, "relu", torch_name="head.0"), mobilenet_arch.Dense(5, torch_name="head.2")))
    arch = mobilenet_arch.with_classes(mobilenet_arch.mobilenet_v2(0.35, classifier=head), 3)
    assert arch.head.torch_names == ("head.0", "head.2") and arch.num_classes == 3


def test_a_live_torch_ref_module_is_read_with_its_own_head():
    head = mobilenet_arch.Head((mobilenet_arch.Dense(16, 0.1, "tanh", torch_name="head.0"), mobilenet_arch.Dense(3, torch_name="fc")))
    model = torch_ref.MobileNetV2(width_mult=0.35, classifier=head).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ReLU is assumed": the module says its activations
        ckpt = parity.load(model)
    assert ckpt.architecture.head == head


@pytest.mark.parametrize("kind", ["hidden", "headless"])
def test_report_compares_heads_of_any_kind(tmp_path, kind, capsys):
    from parity import report

    model = torch_ref.MobileNetV2(**({"num_classes": 4, "width_mult": 0.35, "hidden": (16,)} if kind == "hidden" else {"num_classes": 0, "width_mult": 0.35})).eval()
    parity.save(parity.load(model), tmp_path / "m.msgpack")
    assert report.main(["--arch", "v2", "--weights", str(tmp_path / "m.msgpack"), "--resolution", "32"]) == 0
    assert "pool" in capsys.readouterr().out
    reference = ["--arch", "v2", "--weights", str(tmp_path / "m.msgpack"), "--resolution", "32", "--reference", "torchvision"]
    if kind == "headless":
        assert report.main(reference) == 0
    else:  # torchvision's mobilenet_v2 has one linear classifier
        with pytest.raises(SystemExit) as e:
            report.main(reference)
        assert e.value.code == 2 and "use --reference torch_ref" in capsys.readouterr().err
