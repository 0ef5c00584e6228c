"""parity.load against torchvision, timm and transformers themselves: random weights, randomised
BatchNorm, nothing downloaded. Each source's logits and the Flax model's agree to float32
rounding; round trips through every layout are bit-exact; bad input is named in one line."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import parity
from parity import convert
from parity.layouts import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, Preprocessing
from parity.models import relative_l2
from parity.random_weights import randomize_batchnorm
from tests.cli_errors import assert_one_line_error

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# float32 rounding through ~50 layers: 1e-7 to 1e-5 relative L2 measured; a layout, padding or
# epsilon mistake is 1e-2 or more.
TOLERANCE = 1e-5


def logits_gap(checkpoint, run, size: int, dtype=np.float32) -> float:
    x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
    got = np.asarray(checkpoint.model.apply(checkpoint.variables, x, train=False))
    with torch.no_grad():
        ref = run(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(torch.float64 if dtype == np.float64 else torch.float32))
    return relative_l2(got, ref.numpy())


def hf_model(version: str, **config):
    cls = getattr(transformers, f"MobileNet{version}ForImageClassification")
    cfg = getattr(transformers, f"MobileNet{version}Config")(num_labels=1001, **config)
    return randomize_batchnorm(cls(cfg), 0).eval()


@pytest.mark.parametrize(
    "name, width, size",
    [("v2", 0.3, 67)],  # a width in no list; an odd input
)
def test_torchvision_any_width_matches(name, width, size):
    import torchvision

    model = randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=width), 0).eval()
    ckpt = parity.load(model.state_dict())
    assert (ckpt.layout, ckpt.architecture.width_mult) == ("torchvision", width)
    assert logits_gap(ckpt, model, size) <= TOLERANCE


@pytest.mark.parametrize("name", ["mobilenetv1_100h", "mobilenetv2_035", "mobilenetv2_110d"])
def test_timm_matches(name):
    model = randomize_batchnorm(timm.create_model(name), 0).eval()
    ckpt = parity.load(model)
    assert ckpt.layout == "timm"
    assert logits_gap(ckpt, model, 67) <= TOLERANCE


def test_timm_deepest_matches_float64():
    # mobilenetv2_120d's float32 logits are themselves ~9e-6 from its float64 ones: held to the
    # float64 run, the Flax model may be twice as far as timm's own float32 (plus rounding).
    model = randomize_batchnorm(timm.create_model("mobilenetv2_120d"), 0).eval()
    ckpt = parity.load(model)
    assert ckpt.architecture.stage_depths == (1, 3, 5, 6, 5, 5, 1)
    torch32 = logits_gap(ckpt, model, 64)
    model64 = model.double()
    x = np.random.default_rng(64).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref64 = model64(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()).numpy()
        ref32 = model.float()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    flax = np.asarray(ckpt.model.apply(ckpt.variables, x, train=False))
    assert relative_l2(flax, ref64) <= 2 * relative_l2(ref32, ref64) + 1e-6, torch32


def test_timm_preprocessing_is_its_pretrained_cfg():
    ckpt = parity.load(timm.create_model("mobilenetv1_100"))
    p = ckpt.preprocessing
    assert (p.mean, p.std, p.interpolation, p.crop_size) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 256)


@pytest.mark.parametrize(
    "name, expected",
    [  # what timm's published weights expect; V1's (mobilenetv1_100.ra4_e3600_r224_in1k) at its test size
        ("mobilenetv1_100", Preprocessing(INCEPTION_MEAN, INCEPTION_STD, 269, 256, "bicubic")),
        ("mobilenetv2_035", Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "bicubic")),
    ],
)
def test_a_saved_timm_file_gets_the_preprocessing_of_timms_weights(tmp_path, name, expected):
    # A file carries no pretrained_cfg (a live model does: test_timm_preprocessing_is_its_pretrained_cfg).
    torch.save(timm.create_model(name).state_dict(), tmp_path / "w.pth")
    ckpt = parity.load(tmp_path / "w.pth")
    assert ckpt.layout == "timm" and ckpt.preprocessing == expected


@pytest.mark.parametrize(
    "version, config, size",  # TensorFlow SAME pads differently at odd and even sizes
    [
        ("V1", dict(depth_multiplier=0.3), 67),  # 9, 19, 38 ... channels: no multiple of 8
        ("V1", dict(depth_multiplier=0.25, tf_padding=False), 64),
        ("V2", dict(depth_multiplier=0.35), 64),
        ("V2", dict(depth_multiplier=0.5, finegrained_output=False, first_layer_is_expansion=False), 67),
    ],
)
def test_transformers_matches(version, config, size):
    model = hf_model(version, **config)
    ckpt = parity.load(model)
    assert ckpt.layout == "hf" and ckpt.architecture.num_classes == 1001
    assert logits_gap(ckpt, lambda x: model(pixel_values=x).logits, size) <= TOLERANCE


def test_transformers_batchnorm_epsilon_is_read_from_the_config_and_written_back(tmp_path):
    # Not transformers' default 1e-3, which is also what a config without the key gets. Where a
    # variance is near 1, 1e-2 instead of 1e-3 moves the layer's scale by 0.5%, far above TOLERANCE.
    model = hf_model("V1", depth_multiplier=0.25, layer_norm_eps=1e-2)
    ckpt = parity.load(model)
    assert ckpt.architecture.bn_epsilon == 1e-2
    assert logits_gap(ckpt, lambda x: model(pixel_values=x).logits, 64) <= TOLERANCE
    parity.save(ckpt, tmp_path / "out")
    back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert back.config.layer_norm_eps == 1e-2
    assert parity.load(tmp_path / "out").architecture == ckpt.architecture


def test_hf_directory_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path):
    model = hf_model("V2", depth_multiplier=0.35)
    model.save_pretrained(tmp_path / "src")
    ckpt = parity.load(tmp_path / "src")
    parity.save(ckpt, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(back.state_dict()[key], value), key
    again = parity.load(tmp_path / "out")
    assert again.architecture == ckpt.architecture


@pytest.mark.parametrize("layout, name", [("torchvision", "w.pth"), ("timm", "w.safetensors"), ("flax", "w.msgpack")])
def test_round_trips_through_each_pytorch_layout_are_bit_exact(tmp_path, layout, name):
    ckpt = parity.load(randomize_batchnorm(timm.create_model("mobilenetv2_110d"), 0).eval())
    parity.save(ckpt, tmp_path / name, layout=layout)
    again = parity.load(tmp_path / name)
    assert again.architecture == ckpt.architecture or layout != "flax"
    assert again.architecture.stage_depths == ckpt.architecture.stage_depths
    for a, b in zip(jax_leaves(again.variables), jax_leaves(ckpt.variables), strict=True):
        assert np.array_equal(a, b)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_msgpack_carries_its_architecture_and_preprocessing(tmp_path):
    ckpt = parity.load(hf_model("V1", depth_multiplier=0.3))
    parity.save(ckpt, tmp_path / "m.msgpack")
    again = parity.load(tmp_path / "m.msgpack")
    assert again.architecture == ckpt.architecture and again.preprocessing == ckpt.preprocessing


def test_load_torch_runs_tf_padded_weights_like_transformers():
    model = hf_model("V2", depth_multiplier=0.35)
    torch_model = parity.load_torch(model)
    x = torch.randn(2, 3, 67, 67)
    with torch.no_grad():
        assert relative_l2(torch_model(x).numpy(), model(pixel_values=x).logits.numpy()) <= TOLERANCE


def test_flax_to_torch_at_a_width_in_no_list():
    import torchvision

    sd = randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.6), 0).state_dict()
    back = parity.flax_to_torch(parity.torch_to_flax(sd, "v2"), "v2")
    assert all(torch.equal(back[k], v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))


# Errors: one line, exit 2, no output file.


def run_convert(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(a) for a in args])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_another_timm_model_is_named(tmp_path, capsys):
    torch.save(timm.create_model("mobilenetv3_large_100").state_dict(), tmp_path / "v3.pth")
    err = run_convert(capsys, tmp_path / "v3.pth", tmp_path / "out.msgpack")
    assert_one_line_error(err, "a timm mobilenetv3_large_100 checkpoint", "not MobileNetV1/V2")
    assert not (tmp_path / "out.msgpack").exists()


def test_unrecognised_layout_lists_what_it_saw_and_what_each_expects(tmp_path, capsys):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "x.pth")
    err = run_convert(capsys, tmp_path / "x.pth", tmp_path / "out.msgpack")
    assert_one_line_error(err, "unrecognised layout", "encoder.weight", "torchvision:", "timm:", "hf:", "keras:")


def test_whole_pickled_module_says_save_the_state_dict(tmp_path, capsys):
    import torchvision

    torch.save(torchvision.models.mobilenet_v2(width_mult=0.25), tmp_path / "whole.pth")
    err = run_convert(capsys, tmp_path / "whole.pth", tmp_path / "out.msgpack")
    assert_one_line_error(err, "whole pickled model", "save model.state_dict()")


def test_module_prefix_is_stripped_with_a_note(tmp_path, capsys):
    import torchvision

    sd = torchvision.models.mobilenet_v2(width_mult=0.25).state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    assert convert.main([str(tmp_path / "ddp.pth"), str(tmp_path / "out.msgpack")]) == 0
    assert "'module.'" in capsys.readouterr().out


def test_truncated_hf_weights_are_refused(tmp_path, capsys):
    hf_model("V1", depth_multiplier=0.25).save_pretrained(tmp_path / "d")
    capsys.readouterr()  # transformers' progress bar
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = run_convert(capsys, tmp_path / "d", tmp_path / "out.msgpack")
    assert_one_line_error(err, "not a readable safetensors file")


def test_tf_padded_weights_cannot_be_written_as_torchvision(tmp_path):
    ckpt = parity.load(hf_model("V1", depth_multiplier=0.25))
    with pytest.raises(parity.LayoutError, match="pad symmetrically"):
        parity.save(ckpt, tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()


def test_an_override_that_disagrees_names_both(tmp_path):
    import torchvision

    sd = torchvision.models.mobilenet_v2(width_mult=0.75).state_dict()
    with pytest.raises(parity.ConversionError, match=r"width 0.75 .*width_mult=1 was asked for"):
        parity.load(sd, width_mult=1.0)
    with pytest.raises(parity.ConversionError, match="MobileNetV2.*not MobileNetV1"):
        parity.load(sd, arch="v1")


def test_the_hint_names_exactly_the_layouts_that_can_hold_the_weights(tmp_path):
    # Google's TF-padded V1 (epsilon 1e-3): torchvision and timm pad symmetrically with 1e-5, Keras
    # fixes each stride-2 padding when it builds a model; the hint is computed, so it must name
    # every layout a save succeeds in and none it fails in.
    ckpt = parity.load(hf_model("V1", depth_multiplier=0.25))
    with pytest.raises(parity.LayoutError) as refused:
        parity.save(ckpt, tmp_path / "w.pth")
    hint = str(refused.value).split("save them as ")[1]
    targets = {"torchvision": "w.pth", "timm": "t.pth", "hf": "hf_dir", "keras": "w.keras", "flax": "w.msgpack"}
    for layout, name in targets.items():
        named = (".msgpack" if layout == "flax" else layout) in hint.replace(" or ", ", ").split(", ")
        try:
            parity.save(ckpt, tmp_path / name, layout=layout)
            saved = True
        except parity.LayoutError:
            saved = False
        assert saved == named, (layout, hint)
        assert (tmp_path / name).exists() == saved


def test_a_target_that_cannot_hold_the_weights_is_refused_before_verify_runs(tmp_path, capsys):
    import torchvision

    torch.save(torchvision.models.mobilenet_v2(width_mult=0.25).state_dict(), tmp_path / "tv.pth")
    err = run_convert(capsys, tmp_path / "tv.pth", tmp_path / "out.keras", "--verify")
    assert_one_line_error(err, "epsilon 1e-3", "save them as")
    assert "verify:" not in capsys.readouterr().out
    assert not (tmp_path / "out.keras").exists()


def test_no_tool_branches_on_a_layout_name():
    # Everything layout-specific is in the layout's record: load, save, convert, report and export
    # read the registry, so a new layout is one module and one registry entry: no comparison with a
    # layout's name, nor a name passed as layout=.
    import ast
    from pathlib import Path

    from parity.layouts.registry import NAMES

    root = Path(parity.__file__).parent
    for module in ("checkpoint.py", "convert.py", "report.py", "export.py", "weights.py"):
        for node in ast.walk(ast.parse((root / module).read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                # report's --reference (torch_ref or torchvision's model) and a file's framework
                # (torch or flax) share names with layouts without being one
                other_meaning = any(word in ast.unparse(side) for side in sides for word in ("reference", "framework"))
                named = [side for side in sides if isinstance(side, ast.Constant) and side.value in NAMES]
                assert not named or other_meaning, (module, ast.unparse(node))
            if isinstance(node, ast.keyword) and node.arg == "layout" and isinstance(node.value, ast.Constant):
                assert node.value.value not in NAMES, (module, ast.unparse(node))


def test_checkpoint_and_architecture_print_in_one_short_line():
    # repr(ckpt) was the variables' whole repr (400 KB) and the architecture's every layer (12 KB).
    ckpt = parity.load(hf_model("V2", depth_multiplier=0.35))
    for text in (repr(ckpt), repr(ckpt.architecture), str(ckpt.architecture)):
        assert "\n" not in text and len(text) < 300, text
    assert "MobileNetV2 width 0.35" in repr(ckpt) and "dense 1001" in repr(ckpt)
    assert "TensorFlow padding" in repr(ckpt) and "epsilon 0.001" in repr(ckpt) and "from hf" in repr(ckpt)


@pytest.mark.parametrize("target, layout, library", [("w.pth", None, "torchvision"), ("t.pth", "timm", "timm"), ("hf_dir", None, "transformers"), ("w.msgpack", None, "Flax")])
def test_verify_runs_the_library_the_file_is_written_for_on_that_file(tmp_path, capsys, target, layout, library):
    import torchvision

    torch.save(randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=7), 3).state_dict(), tmp_path / "src.pth")
    args = [str(tmp_path / "src.pth"), str(tmp_path / target), "--verify", "--resolution", "64"] + (["--layout", layout] if layout else [])
    assert convert.main(args) == 0
    out = capsys.readouterr().out
    assert f"verify: {library}" in out and f"on the written {target} vs Flax" in out, out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staged copy moved into place


def test_a_written_file_its_library_disagrees_with_is_not_kept(tmp_path, capsys, monkeypatch):
    import dataclasses

    import torchvision

    from parity.layouts import registry

    torch.save(torchvision.models.mobilenet_v2(width_mult=0.25).state_dict(), tmp_path / "src.pth")
    real = registry.LAYOUTS["torchvision"].run_written

    def one_percent_off(path, ckpt, x):  # a library that reads the written file differently
        library, logits = real(path, ckpt, x)
        return library, logits * 1.01

    monkeypatch.setitem(registry.LAYOUTS, "torchvision", dataclasses.replace(registry.LAYOUTS["torchvision"], run_written=one_percent_off))
    assert convert.main([str(tmp_path / "src.pth"), str(tmp_path / "w.pth"), "--verify", "--resolution", "64"]) == 1
    assert "FAILED, nothing written" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]


def test_a_hugging_face_directory_may_have_dots_in_its_name(tmp_path):
    # Google's names: mobilenet_v2_1.0_224 (".0_224" is no file extension)
    ckpt = parity.load(hf_model("V2", depth_multiplier=0.35))
    parity.save(ckpt, tmp_path / "mobilenet_v2_0.35_96")
    assert (tmp_path / "mobilenet_v2_0.35_96" / "config.json").is_file()
    assert parity.load(tmp_path / "mobilenet_v2_0.35_96").layout == "hf"


@pytest.mark.parametrize(
    "name, layout",
    [("w.pth", "torchvision"), ("w.safetensors", "torchvision"), ("m.keras", "keras"), ("m.weights.h5", "keras"),
     ("m.msgpack", "flax"), ("hf_dir", "hf"), ("mobilenet_v2_1.0_224", "hf"), ("mobilenetv2_100.ra_in1k", "hf")],
)
def test_the_layout_a_file_name_asks_for(name, layout):
    from pathlib import Path

    from parity.layouts.registry import layout_for_path

    assert layout_for_path(Path(name)) == layout
