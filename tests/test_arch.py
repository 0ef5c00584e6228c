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


# ---------------------------------------------------------------- dropout as each source has it


def test_v2_dropout_is_torchvisions():
    torchvision = pytest.importorskip("torchvision")
    # torchvision's mobilenet_v2 drops 20% before its classifier; ours must, or fine-tuning
    # torchvision's weights here would regularise differently from fine-tuning them there.
    assert torchvision.models.mobilenet_v2().classifier[0].p == 0.2
    assert mobilenet_arch.mobilenet_v2().dropout == torchvision.models.mobilenet_v2().classifier[0].p
    assert torch_ref.MobileNetV2().classifier[0].p == torchvision.models.mobilenet_v2().classifier[0].p


def test_dropout_is_recorded_as_given():
    assert mobilenet_arch.mobilenet_v1().dropout == 0.0  # timm's drop_rate default; V1 has no torchvision model
    assert mobilenet_arch.mobilenet_v2(dropout=0.0).dropout == 0.0
    # Hugging Face's configs carry TensorFlow's keep probability as `classifier_dropout_prob`
    # (0.999, 0.8); the description keeps what the source says.
    c = mobilenet_arch.hf_v2_channels(1.0)
    assert mobilenet_arch.mobilenet_v2_from_blocks(*c, dropout=0.8).dropout == 0.8


# ---------------------------------------------------------------- builders from explicit channels


def test_v1_from_its_own_channels_is_the_same_description():
    arch = mobilenet_arch.mobilenet_v1(0.75)
    stem, outs, _ = mobilenet_arch.mobilenet_v1_channels(0.75)
    assert mobilenet_arch.mobilenet_v1_from_channels(stem, outs, width_mult=0.75) == arch


def test_v2_from_its_own_blocks_is_the_same_description():
    arch = mobilenet_arch.mobilenet_v2(1.4)
    assert mobilenet_arch.mobilenet_v2_from_blocks(*mobilenet_arch.mobilenet_v2_channels(1.4), width_mult=1.4) == arch


def test_any_width_is_described_from_its_channels():
    # Hugging Face's V1 at depth multiplier 0.3: channels no multiple of 8, no list of widths.
    arch = mobilenet_arch.mobilenet_v1_from_channels(9, (19, 38, 38, 76, 76, 153, 153, 153, 153, 153, 153, 307, 307))
    assert [b.out_channels for b in arch.blocks][:3] == [9, 19, 38]
    assert arch.num_features == 307
    assert arch.width_mult == 9 / 32  # a label only: the stem's share of 32


def test_v1_head_is_a_last_conv_bn_block_feeding_the_classifier():
    arch = mobilenet_arch.mobilenet_v1(1.0, head=True)  # timm's mobilenetv1_100h
    head = arch.blocks[-1]
    assert (head.kind, head.layers[0].role, head.layers[0].kernel_size) == ("conv_bn", "head", 1)
    assert (head.in_channels, head.out_channels, arch.num_features) == (1024, 1024, 1024)
    assert head.layers[0].torch_conv == "features.14.0"


def test_blocks_are_in_stage_and_repeat_order_with_the_stem_first_and_the_head_last():
    v1_with_head = mobilenet_arch.mobilenet_v1(1.0, head=True)
    v2_deeper = mobilenet_arch.mobilenet_v2(1.2, depth_mult=1.4, fix_stem_head=True)
    for arch in (v1_with_head, v2_deeper):
        positions = [(b.stage, b.repeat) for b in arch.blocks]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert positions[0] == (-1, 0)
        assert positions[-1] == (len(arch.stage_depths), 0)


def test_v1_stages_are_timms():
    # timm's arch_def: dsa_r1_c64, dsa_r2_s2_c128, dsa_r2_s2_c256, dsa_r6_s2_c512, dsa_r2_s2_c1024.
    arch = mobilenet_arch.mobilenet_v1(1.0)
    assert arch.stage_depths == (1, 2, 2, 6, 2)
    assert [(b.stage, b.repeat) for b in arch.blocks[6:9]] == [(3, 0), (3, 1), (3, 2)]  # features_6 starts 512


def test_only_the_first_repeat_of_a_stage_has_the_stride():
    arch = mobilenet_arch.mobilenet_v2(1.0, depth_mult=1.4)
    for block in arch.blocks[1:-1]:
        stride = mobilenet_arch.V2_BLOCKS[block.stage][3] if block.repeat == 0 else 1
        assert block.stride == stride
        assert block.residual == (block.repeat > 0)  # same channels and stride 1: the residual


def test_stem_residual_false_denies_the_first_block_its_residual():
    # At width 0.2 the stem and the first block both have 8 channels and stride 1: torchvision
    # adds the block's input; Hugging Face's stem never does.
    c = mobilenet_arch.hf_v2_channels(0.2)
    assert c.stem == c.blocks[0][1] == 8
    assert mobilenet_arch.mobilenet_v2_from_blocks(*c).blocks[1].residual
    assert not mobilenet_arch.mobilenet_v2_from_blocks(*c, stem_residual=False).blocks[1].residual


def test_a_first_block_with_an_expansion_layer_keys_it_first():
    c = mobilenet_arch.hf_v2_channels(0.75, first_layer_is_expansion=False)
    block = mobilenet_arch.mobilenet_v2_from_blocks(*c).blocks[1]
    assert [layer.role for layer in block.layers] == ["expand", "depthwise", "project"]
    assert block.layers[0].in_channels == block.layers[0].out_channels == c.stem
    keys = [layer.torch_conv for layer in block.layers]
    assert keys == ["features.1.conv.0.0", "features.1.conv.1.0", "features.1.conv.2"]


def test_bn_epsilon_is_recorded():
    assert mobilenet_arch.mobilenet_v2().bn_epsilon == 1e-5  # PyTorch's BatchNorm2d default
    assert mobilenet_arch.mobilenet_v1(0.5, bn_epsilon=1e-3).bn_epsilon == 1e-3


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: mobilenet_arch.mobilenet_v1_from_channels(32, [64] * 12), "13 depthwise-separable blocks: got 12"),
        (lambda: mobilenet_arch.mobilenet_v1_from_channels(32, [64] * 12 + [0]), "positive integers, got 0"),
        (lambda: mobilenet_arch.mobilenet_v2_from_blocks(32, [(None, 16, 1)], 1280), r"\(expanded channels or None"),
        (lambda: mobilenet_arch.mobilenet_v2(1.0, bn_epsilon=0), "bn_epsilon must be positive"),
        (lambda: mobilenet_arch.mobilenet_v2(1.0, depth_mult=0), "depth_mult must be positive"),
        (lambda: mobilenet_arch.mobilenet_v1(0), "width_mult must be positive"),
    ],
)
def test_bad_channels_are_refused_with_what_is_expected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------- each library's channel rule


def test_timm_mobilenetv2_110d_and_120d_scale_depth_with_fixed_stem_and_head():
    c = mobilenet_arch.mobilenet_v2_channels(1.1, depth_mult=1.2, fix_stem_head=True)
    arch = mobilenet_arch.mobilenet_v2_from_blocks(*c)
    assert arch.stage_depths == (1, 3, 4, 5, 4, 4, 1)
    stage_outs = [out for _, out, _, _, repeat in c.blocks if repeat == 0]
    assert (c.stem, stage_outs, c.head) == (32, [16, 24, 32, 72, 104, 176, 352], 1280)
    assert mobilenet_arch.mobilenet_v2(1.2, depth_mult=1.4, fix_stem_head=True).stage_depths == (1, 3, 5, 6, 5, 5, 1)


def test_depth_without_fixed_ends_scales_every_stage():
    assert mobilenet_arch.scale_depths(1.2) == (2, 3, 4, 5, 4, 4, 2)  # ceil(n * 1.2)
    assert mobilenet_arch.scale_depths(1.0) == mobilenet_arch.V2_STAGE_DEPTHS


def test_timm_mobilenetv1_125_and_100h_channels():
    c = mobilenet_arch.mobilenet_v1_channels(1.25)
    assert (c.stem, c.outs[0], c.outs[-1], c.head) == (40, 80, 1280, None)
    assert mobilenet_arch.mobilenet_v1_channels(1.0, head=True).head == 1024
    assert mobilenet_arch.mobilenet_v1_channels(1.25, head=True).head == 1280  # max(1024, round(1024w))
    assert mobilenet_arch.mobilenet_v1_channels(1.25, head=True, fix_stem_head=True)[::2] == (32, 1024)


def test_hf_v1_truncates_without_rounding_to_eight():
    c = mobilenet_arch.hf_v1_channels(0.3)
    assert c.stem == 9 and sorted(set(c.outs)) == [19, 38, 76, 153, 307]
    assert mobilenet_arch.hf_v1_channels(0.1).stem == 8  # min_depth
    assert mobilenet_arch.hf_v1_channels(0.1, min_depth=2).stem == 3


def test_hf_v2_rounds_then_makes_divisible_and_keeps_a_finegrained_head():
    assert mobilenet_arch.hf_v2_channels(0.5).head == 1280
    assert mobilenet_arch.hf_v2_channels(0.5, finegrained_output=False).head == 640  # torchvision cannot
    assert mobilenet_arch.hf_v2_channels(1.4).head == 1792
    # round(32 * 0.27) = 9 -> 16; torchvision's make_divisible(8.64) = 8.
    assert mobilenet_arch.hf_v2_channels(0.27).stem == 16 != mobilenet_arch.mobilenet_v2_channels(0.27).stem
    assert mobilenet_arch.hf_v2_channels(1.0) == mobilenet_arch.mobilenet_v2_channels(1.0)


def test_keras_v1_truncates_with_no_minimum():
    c = mobilenet_arch.keras_v1_channels(0.3)
    assert c.stem == 9 and sorted(set(c.outs)) == [19, 38, 76, 153, 307]
    assert mobilenet_arch.keras_v1_channels(0.1)[:2] == (3, (6, 12, 12, 25, 25, 51, 51, 51, 51, 51, 51, 102, 102))


def test_keras_v2_truncates_before_making_divisible_and_expands_exactly():
    c = mobilenet_arch.keras_v2_channels(0.42)
    # Stage 3 (c = 64): int(26.88) = 26 -> 24; torchvision's make_divisible(26.88) = 24 is below
    # 90% of 26.88, so 32.
    assert c.blocks[6][1] == 24 and mobilenet_arch.mobilenet_v2_channels(0.42).blocks[6][1] == 32
    assert all(hidden == 6 * cin for (hidden, *_), (_, cin, *_) in zip(c.blocks[1:], c.blocks))
    assert mobilenet_arch.keras_v2_channels(0.5).head == 1280
    assert mobilenet_arch.keras_v2_channels(1.3).head == 1664
