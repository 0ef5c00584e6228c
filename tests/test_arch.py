"""The architecture description reproduces the papers' numbers and names PyTorch's keys."""

from __future__ import annotations

import pytest

import mobilenet_arch
import torch_ref
from flax_mobilenet.summary import flax_parameter_count
from parity.weights import batches_tracked_keys, expected_shapes


def totals(arch: mobilenet_arch.Architecture, resolution: int = 224) -> tuple[float, float]:
    """(parameters, multiply-adds) in millions."""
    rows = mobilenet_arch.layer_table(arch, resolution)
    return sum(r["params"] for r in rows) / 1e6, sum(r["mult_adds"] for r in rows) / 1e6


# Howard et al. 2017, Tables 6 and 7: width alpha at 224 -> (million parameters, million mult-adds).
@pytest.mark.parametrize("width, params, mult_adds", [(1.0, 4.2, 569), (0.75, 2.6, 325), (0.5, 1.3, 149), (0.25, 0.5, 41)])
def test_v1_parameters_and_mult_adds_match_the_paper_for_each_width(width, params, mult_adds):
    got_params, got_mult_adds = totals(mobilenet_arch.mobilenet_v1(width))
    # The paper prints parameters to 0.1M: ours must round to the printed value.
    assert abs(got_params - params) <= 0.05
    # It prints mult-adds to 1M, rounded in some rows and truncated in others (568.7 -> 569,
    # 290.7 -> 290): ours must lie within 1M of the printed value.
    assert abs(got_mult_adds - mult_adds) < 1


# Howard et al. 2017, Table 7: alpha = 1 at smaller inputs (the resolution multiplier).
@pytest.mark.parametrize("resolution, mult_adds", [(192, 418), (160, 290), (128, 186)])
def test_v1_mult_adds_match_the_paper_for_each_resolution(resolution, mult_adds):
    _, got = totals(mobilenet_arch.mobilenet_v1(1.0), resolution)
    assert abs(got - mult_adds) < 1  # printed to 1M, rounded or truncated (see above)


def test_v2_parameters_equal_torchvision_and_flax():
    torchvision = pytest.importorskip("torchvision")
    arch = mobilenet_arch.mobilenet_v2(1.0)
    count = mobilenet_arch.parameter_count(arch)
    assert count == 3_504_872  # torchvision's documented count: exact
    assert count == sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters())
    assert count == flax_parameter_count(arch, 224)


def test_v2_mult_adds_are_about_300_million():
    _, got = totals(mobilenet_arch.mobilenet_v2(1.0))
    assert abs(got - 300) < 5  # Sandler et al. print "300M"; torchvision lists 300.77M


def test_v1_last_depthwise_layer_keeps_7x7():
    # The paper's table prints s2 there, but its input and output are both 7x7.
    rows = mobilenet_arch.layer_table(mobilenet_arch.mobilenet_v1(1.0), 224)
    assert rows[-2]["input"] == (7, 7, 1024)  # the average pool's input


@pytest.mark.parametrize("arch, width", [("v1", w) for w in (0.25, 0.5, 0.75, 1.0)] + [("v2", w) for w in (0.35, 0.5, 0.75, 1.0, 1.4)])
def test_declared_torch_keys_and_shapes_are_torch_refs(arch, width):
    architecture = mobilenet_arch.architecture(arch, width)
    declared = {**expected_shapes(architecture), **{k: () for k in batches_tracked_keys(architecture)}}
    actual = {k: tuple(v.shape) for k, v in torch_ref.create_model(arch, width).state_dict().items()}
    assert declared == actual


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'v3'"):
        mobilenet_arch.architecture("v3")
