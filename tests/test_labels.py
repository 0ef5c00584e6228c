"""Class names travel with the weights: `Checkpoint.labels` read from every source that has them
(transformers' id2label, a .msgpack's description, a run's record, torchvision's weights enums,
timm's Hub config), given by the user (a list or a file), written to every target with a place
for them (id2label/label2id, the description, ONNX metadata_props) and read back; Google's
background class dropped on request; `train.predict` and `train.eval` use the checkpoint's; the
tools say what they read, inferred and replaced.

Small models (V2 width 0.35, 32 or 64 pixels): nothing here depends on the width. Models of
transformers and timm are built once per test run (tests.shared.built_once).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import parity
from parity import convert, export
from parity.layouts import Preprocessing
from parity.models import relative_l2
from parity.random_weights import random_torch_model, randomize_batchnorm
from tests.cli_errors import assert_one_line_error
from tests.shared import built_once

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

NAMES = ("cat", "dog", "bird", "fish")
# torchvision's ImageNet class names, installed with it: Google's 1001 outputs are "background"
# and these.
IMAGENET = tuple(__import__("torchvision").models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
GOOGLE = ("background", *IMAGENET)
SMALL = Preprocessing(resize_size=32, crop_size=32)


def _google_like(root):
    """A transformers MobileNetV2 (width 0.35) with Google's 1001 outputs and their names."""
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, id2label=dict(enumerate(GOOGLE)), label2id={n: i for i, n in enumerate(GOOGLE)})
    randomize_batchnorm(transformers.MobileNetV2ForImageClassification(config), 0).eval().save_pretrained(root)


@pytest.fixture(scope="module")
def google(tmp_path_factory):
    return built_once(tmp_path_factory, "labels-google-v2", _google_like)


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A 4-class V2 as .msgpack with NAMES, 32-pixel preprocessing."""
    folder = tmp_path_factory.mktemp("named")
    parity.save(parity.load(random_torch_model("v2", 0.35, len(NAMES), seed=3), labels=NAMES, preprocessing=SMALL), folder / "model.msgpack")
    return folder / "model.msgpack"


def images(batch: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------- reading and writing each layout


def test_transformers_id2label_is_read_as_the_labels(google):
    assert parity.load(google).labels == GOOGLE


def test_transformers_placeholder_names_are_no_labels(tmp_path):
    # PretrainedConfig's LABEL_0, LABEL_1, ... for a model given only num_labels: names nobody gave.
    transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(depth_multiplier=0.35, num_labels=4)).save_pretrained(tmp_path)
    assert parity.load(tmp_path).labels is None


def test_labels_are_written_to_id2label_and_label2id_and_transformers_reads_them(named, tmp_path):
    parity.save(parity.load(named), tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.id2label == dict(enumerate(NAMES))
    assert config.label2id == {name: i for i, name in enumerate(NAMES)}
    assert parity.load(tmp_path / "hf").labels == NAMES


def test_the_msgpack_description_holds_the_labels(named):
    assert json.loads(named.with_name(named.name + ".json").read_text())["labels"] == list(NAMES)
    assert parity.load(named).labels == NAMES


def test_a_training_runs_class_names_in_the_description_are_read(tmp_path):
    # What train.main writes (parity.save(..., extra=run record)): the run's `class_names`.
    checkpoint = parity.load(random_torch_model("v2", 0.35, len(NAMES), seed=3))
    parity.save(checkpoint, tmp_path / "run.msgpack", extra={"class_names": list(NAMES)})
    assert parity.load(tmp_path / "run.msgpack").labels == NAMES


def test_a_training_runs_exported_weights_carry_its_class_names(named, tmp_path):
    # train.main's export (train/runners.py) on a run whose dataset names its classes.
    from train import plan, runners

    source = parity.load(named)
    run_plan = plan.Plan(4, 32, 1, 1, 1, 1, architecture=source.architecture, preprocessing=SMALL, class_names=("w", "x", "y", "z"))
    runners.export_weights(run_plan, tmp_path, "model", source.variables, step=1, described={"class_names": ["w", "x", "y", "z"]})
    assert json.loads((tmp_path / "model.msgpack.json").read_text())["labels"] == ["w", "x", "y", "z"]
    assert parity.load(tmp_path / "model.msgpack").labels == ("w", "x", "y", "z")


def test_labels_survive_hf_to_msgpack_to_hf(google, tmp_path):
    parity.save(parity.load(google), tmp_path / "m.msgpack")
    parity.save(parity.load(tmp_path / "m.msgpack"), tmp_path / "back")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "back").id2label == dict(enumerate(GOOGLE))


def test_a_torchvision_file_has_no_place_for_labels(named, tmp_path):
    parity.save(parity.load(named), tmp_path / "m.pth")
    assert parity.load(tmp_path / "m.pth").labels is None


def test_torchvision_weights_enum_gives_imagenet_names(tmp_path, monkeypatch):
    # The enum's file as torch.hub's cache holds it (random weights of its shapes: nothing downloaded).
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    (tmp_path / "checkpoints").mkdir()
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "checkpoints" / weights.url.rsplit("/", 1)[1])
    assert parity.load("MobileNet_V2_Weights.IMAGENET1K_V1").labels == IMAGENET


def test_a_plain_state_dict_of_1000_classes_gets_no_guessed_names(tmp_path):
    torch.save(random_torch_model("v2", 0.35, 1000, seed=1).state_dict(), tmp_path / "m.pth")
    assert parity.load(tmp_path / "m.pth").labels is None


def _timm_hub_repository(name: str):
    def build(root):
        timm = pytest.importorskip("timm")
        # timm's own writer of a Hub repository: config.json with the model's pretrained tag.
        timm.models.save_for_hf(timm.create_model(name), str(root), safe_serialization=True)

    return build


def test_a_timm_imagenet_repository_gets_timms_imagenet_names(tmp_path_factory):
    timm = pytest.importorskip("timm")
    # mobilenetv2_100's pretrained tag is ra_in1k: ImageNet-1k's weights.
    ckpt = parity.load(built_once(tmp_path_factory, "labels-timm-in1k", _timm_hub_repository("mobilenetv2_100")))
    assert ckpt.layout == "timm"
    assert ckpt.labels == tuple(timm.data.ImageNetInfo("imagenet-1k").label_descriptions())


def test_a_timm_repository_of_untrained_weights_gets_no_names(tmp_path_factory):
    # mobilenetv2_035 has no pretrained weights (tag "untrained"), though it has 1000 outputs.
    ckpt = parity.load(built_once(tmp_path_factory, "labels-timm-untrained", _timm_hub_repository("mobilenetv2_035")))
    assert ckpt.architecture.num_classes == 1000 and ckpt.labels is None


# ---------------------------------------------------------------- given by the user


def test_labels_file_gives_one_name_per_line(named, tmp_path):
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    assert parity.load(named, labels=tmp_path / "labels.txt").labels == ("zero", "one", "two", "three")


def test_labels_of_another_count_are_an_error_naming_both_counts(named):
    with pytest.raises(parity.ConversionError, match="3 class names for 4 outputs"):
        parity.load(named, labels=NAMES[:3])


def test_convert_with_a_labels_file_of_another_count_is_one_line_and_writes_nothing(named, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(named), str(tmp_path / "out.msgpack"), "--labels", str(tmp_path / "labels.txt")])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "labels.txt", "2 class names for 4 outputs")
    assert list(tmp_path.iterdir()) == [tmp_path / "labels.txt"]


def test_convert_labels_file_goes_into_the_written_file(named, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("\n".join(reversed(NAMES)) + "\n")
    convert.main([str(named), str(tmp_path / "hf"), "--labels", str(tmp_path / "labels.txt")])
    assert parity.load(tmp_path / "hf").labels == tuple(reversed(NAMES))
    assert "replaced: labels: 4 given in place of the source's 4" in capsys.readouterr().out


# ---------------------------------------------------------------- Google's background class


def test_dropping_the_background_class_leaves_the_other_logits_unchanged(google):
    full, dropped = parity.load(google), parity.load(google, drop_background=True)
    assert dropped.architecture.num_classes == 1000
    kernel, bias = (np.asarray(dropped.variables["params"]["classifier"][k]) for k in ("kernel", "bias"))
    np.testing.assert_array_equal(kernel, np.asarray(full.variables["params"]["classifier"]["kernel"])[:, 1:])
    np.testing.assert_array_equal(bias, np.asarray(full.variables["params"]["classifier"]["bias"])[1:])
    # One image at a time the classifier is a matrix-vector product, each output its own dot
    # product: bit for bit the same numbers.
    for seed in range(3):
        x = images(1, seed=seed)
        np.testing.assert_array_equal(dropped.logits(x), full.logits(x)[:, 1:])
    # In a batch XLA's CPU matrix product blocks 1000 and 1001 columns differently, which moves the
    # last bit (1e-7 relative measured); a wrong column would be a relative error near 1.
    x = images(4)
    assert relative_l2(dropped.logits(x), full.logits(x)[:, 1:]) <= 1e-6


def test_dropping_the_background_class_drops_its_name(google):
    assert parity.load(google, drop_background=True).labels == IMAGENET


def test_dropping_the_background_of_a_model_without_one_is_an_error(named):
    with pytest.raises(parity.ConversionError, match="4 outputs, not 1001"):
        parity.load(named, drop_background=True)


def test_convert_drop_background_verifies_against_transformers_and_writes_1000_classes(google, tmp_path, capsys):
    assert convert.main([str(google), str(tmp_path / "in1k.msgpack"), "--drop-background", "--verify", "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "verify: transformers (source) vs Flax (converted)" in out
    assert "replaced: background class dropped (1001 -> 1000 outputs)" in out
    back = parity.load(tmp_path / "in1k.msgpack")
    assert back.architecture.num_classes == 1000 and back.labels == IMAGENET


# ---------------------------------------------------------------- deployment files


def test_onnx_export_holds_the_labels_in_its_metadata(named, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime

    export.export(parity.load(named), tmp_path / "m.onnx", resolution=32)
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert json.loads(props["labels"]) == list(NAMES)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["labels"]) == list(NAMES)


def test_an_int8_onnx_file_holds_the_labels_too(named, tmp_path):
    pytest.importorskip("onnxruntime")
    from parity import int8

    # What is checked is the metadata, not the quantization: a few random images calibrate, and
    # any agreement is accepted.
    pictures = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    export.export_int8(parity.load(named), tmp_path / "m.onnx", int8.Images(pictures[:4], pictures[4:], None, "random"), resolution=32, min_agreement=0)
    assert export.onnx_labels((tmp_path / "m.onnx").read_bytes()) == NAMES


def test_export_says_what_it_read_and_that_the_names_were_written(named, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert export.main([str(named), str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"read: flax weights ({named}): MobileNetV2 width 0.35") and "4 labels" in out[0]
    assert out[-1].startswith(f"wrote {tmp_path / 'm.onnx'}") and out[-1].endswith("4 class names written")


# ---------------------------------------------------------------- what the tools say


def test_convert_says_what_a_state_dict_left_to_infer(tmp_path, capsys):
    torch.save(random_torch_model("v2", 0.35, 4, seed=2).state_dict(), tmp_path / "m.pth")
    convert.main([str(tmp_path / "m.pth"), str(tmp_path / "m.msgpack")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"read: torchvision weights ({tmp_path / 'm.pth'}): MobileNetV2 width 0.35") and "no class names" in out[0]
    assert out[1] == "inferred: width 0.35 from the channels, PyTorch padding (symmetric), BatchNorm epsilon 1e-05, preprocessing (not in the source: the layout's defaults)"
    assert out[2].startswith(f"wrote {tmp_path / 'm.msgpack'}") and out[2].endswith("no class names to write (--labels FILE gives them)")
    assert len(out) == 3


def test_convert_says_the_names_have_no_place_in_a_state_dict(named, tmp_path, capsys):
    convert.main([str(named), str(tmp_path / "m.pth")])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("the 4 class names not written: torchvision files have no place for them")
    assert not any(line.startswith("inferred:") for line in out)  # the description says everything


def test_what_load_ignored_is_printed_as_a_note(tmp_path, capsys):
    torch.save({f"module.{k}": v for k, v in random_torch_model("v2", 0.35, 4, seed=2).state_dict().items()}, tmp_path / "dp.pth")
    convert.main([str(tmp_path / "dp.pth"), str(tmp_path / "m.msgpack")])
    assert f"note: {tmp_path / 'dp.pth'}: the keys start with 'module.' (DataParallel): the prefix was stripped" in capsys.readouterr().out


# ---------------------------------------------------------------- train.predict and train.eval


def _write_pngs(root, names=("a", "b")) -> list[str]:
    paths = []
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in names:
            (root / split / name).mkdir(parents=True)
            path = root / split / name / "0.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
    return paths


def _predicted_names(stdout: str) -> set[str]:
    return {line.split(maxsplit=2)[2] for line in stdout.splitlines() if line.startswith("  ")}


def test_predict_names_the_classes_with_the_checkpoints_labels(named, tmp_path, capsys):
    from train import predict

    image = _write_pngs(tmp_path)[0]
    assert predict.main(["--weights", str(named), image]) == 0
    assert _predicted_names(capsys.readouterr().out) == set(NAMES)


def test_predict_reads_a_runs_pth_names_from_its_record(named, tmp_path, capsys):
    # train.main's .pth cannot hold them: its run.json beside it does (train/record.py).
    from train import predict

    parity.save(parity.load(named), tmp_path / "model.pth")
    (tmp_path / "run.json").write_text(json.dumps({"class_names": ["w", "x", "y", "z"], "preprocessing": dataclasses.asdict(SMALL)}))
    image = _write_pngs(tmp_path / "data")[0]
    assert predict.main(["--weights", str(tmp_path / "model.pth"), image]) == 0
    assert _predicted_names(capsys.readouterr().out) == {"w", "x", "y", "z"}


def test_predict_labels_flag_replaces_them_and_a_wrong_count_is_one_line(named, tmp_path, capsys):
    from train import predict

    image = _write_pngs(tmp_path / "data")[0]
    (tmp_path / "four.txt").write_text("n0\nn1\nn2\nn3\n")
    assert predict.main(["--weights", str(named), "--labels", str(tmp_path / "four.txt"), image]) == 0
    assert _predicted_names(capsys.readouterr().out) == {"n0", "n1", "n2", "n3"}
    (tmp_path / "five.txt").write_text("n0\nn1\nn2\nn3\nn4\n")
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--weights", str(named), "--labels", str(tmp_path / "five.txt"), image])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "five.txt", "5 class names for 4 outputs")


def test_eval_refuses_a_dataset_with_the_checkpoints_classes_in_another_order(tmp_path, capsys):
    from train import eval as eval_

    checkpoint = parity.load(random_torch_model("v2", 0.35, 2, seed=5), labels=("b", "a"), preprocessing=SMALL)
    parity.save(checkpoint, tmp_path / "m.msgpack")
    _write_pngs(tmp_path / "data")  # classes a, b (sorted, as ImageFolder's)
    with pytest.raises(SystemExit) as exit_:
        eval_.main(["--weights", str(tmp_path / "m.msgpack"), "--dataset", str(tmp_path / "data")])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "output 0 'b'", "class 0 'a'", "another order")


def test_eval_runs_where_the_checkpoints_classes_are_the_datasets(tmp_path, capsys):
    from train import eval as eval_

    parity.save(parity.load(random_torch_model("v2", 0.35, 2, seed=5), labels=("a", "b"), preprocessing=SMALL), tmp_path / "m.msgpack")
    _write_pngs(tmp_path / "data")
    assert eval_.main(["--weights", str(tmp_path / "m.msgpack"), "--dataset", str(tmp_path / "data"), "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy=")
