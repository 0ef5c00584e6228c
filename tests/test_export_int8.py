"""`python -m parity.export ... --int8 --calibration DATA`: int8 ONNX files of two trained models,
their accuracy on real held-out data beside float32's, the check that refuses a broken
quantization, and each mistake in one line.

The models: test_train_finetune's one epoch of digits (MobileNetV1 0.25 at 32 px, about 50% on the
360 test digits), and that model fine-tuned on photos: crops of scikit-learn's two sample photos
(`load_sample_images`, shipped with it, nothing downloaded), four classes (each photo's left and
right half), 60 training and 100 evaluation JPEGs a class, at 64 px. Both trainings are session
runs that other tests share.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import parity
from parity import export, int8
from parity.random_weights import random_torch_model
from tests.cli_errors import assert_one_line_error
from tests.test_train_finetune import pretrained  # noqa: F401 (a fixture)
from tests.shared import built_once
from tests.test_train_main import compile_cache, shared_run  # noqa: F401 (a fixture)

PHOTO_CLASSES = ("left", "right")
PHOTO_TRAIN, PHOTO_EVAL = 60, 100  # a class
# Five epochs of 15 steps from the digits model: about 60% on the four classes (chance 25%).
PHOTO_FINETUNE = "--resolution 64 --batch-size 16 --epochs 5 --lr 0.05 --warmup-epochs 0 --no-progress".split()
# Accuracy may move by at most 1 point: int8 PTQ of a MobileNet costs about a point of ImageNet
# top-1 (TensorFlow's and onnxruntime's published MobileNetV2 results), and a quantization that is
# right changes only predictions float32 itself nearly ties, which go either way. A point is 3.6
# of the 360 test digits and 4 of the 400 photos: a broken quantization moves it by tens.
ACCURACY_POINTS = 0.01


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "photo-folder", _write_photo_folder)


def _write_photo_folder(root: Path) -> None:
    """Square crops of 64 to 160 pixels, at random places in each half of each photo."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    sample = load_sample_images()
    for file, photo in zip(sample.filenames, sample.images):
        height, width, _ = photo.shape
        for half, (left, right) in zip(PHOTO_CLASSES, ((0, width // 2), (width // 2, width))):
            for split, count in (("train", PHOTO_TRAIN), ("val", PHOTO_EVAL)):
                folder = root / split / f"{Path(file).stem}-{half}"
                folder.mkdir(parents=True)
                for i in range(count):
                    side = int(rng.integers(64, 160))
                    x, y = int(rng.integers(left, right - side)), int(rng.integers(0, height - side))
                    Image.fromarray(photo[y : y + side, x : x + side]).save(folder / f"{i}.jpg", quality=90)


@pytest.fixture(scope="session")
def photo_run(tmp_path_factory, compile_cache, pretrained, photos) -> Path:  # noqa: F811
    return shared_run(tmp_path_factory, compile_cache, "int8-photo-finetune", ["--init-from", str(pretrained / "model.pth"), "--dataset", str(photos), *PHOTO_FINETUNE])


@pytest.fixture(scope="module")
def digits_int8(pretrained, tmp_path_factory):  # noqa: F811
    """The digits model to int8 through the Python API, calibrated and evaluated on digits."""
    checkpoint = parity.load(pretrained / "model.msgpack")
    images = int8.load_images("digits", checkpoint.preprocessing, checkpoint.preprocessing.crop_size, evaluation="digits")
    path = tmp_path_factory.mktemp("int8") / "digits.onnx"
    _, verification = export.export_int8(checkpoint, path, images)
    return path, verification, images


@pytest.fixture(scope="module")
def photos_int8(photo_run, photos, tmp_path_factory):
    """The photo model to int8 through the command line, calibrated on the folder's training
    images and evaluated on its val/: the path and what it printed."""
    path = tmp_path_factory.mktemp("int8") / "photos.onnx"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert export.main([str(photo_run / "model.msgpack"), str(path), "--int8", "--calibration", str(photos), "--eval", str(photos)]) == 0
    return path, out.getvalue()


def _printed(stdout: str) -> int8.Verification:
    found = re.search(r"top-1 agreement ([\d.]+) on (\d+) held-out images, logits' relative L2 ([\d.e-]+); accuracy float32 ([\d.]+), int8 ([\d.]+)", stdout)
    assert found, stdout
    agreement, images, error, float32, quantized = found.groups()
    return int8.Verification(int(images), float(agreement), float(error), float(float32), float(quantized))


# ---------------------------------------------------------------- accuracy on real data


def test_digits_model_in_int8_is_within_a_point_of_float32_on_the_test_digits(digits_int8, record_property):
    _, verification, _ = digits_int8
    for name, value in vars(verification).items():
        record_property(f"digits_{name}", float(value))
    assert verification.images == 360  # digits' whole test split
    assert abs(verification.accuracy_int8 - verification.accuracy_float32) <= ACCURACY_POINTS, verification
    assert verification.agreement >= int8.DEFAULT_MIN_AGREEMENT, verification  # what let the file be kept


def test_photo_finetuned_model_in_int8_is_within_a_point_of_float32_on_its_val_photos(photos_int8, record_property):
    path, stdout = photos_int8
    verification = _printed(stdout)
    for name, value in vars(verification).items():
        record_property(f"photos_{name}", float(value))
    assert verification.images == 4 * PHOTO_EVAL
    assert abs(verification.accuracy_int8 - verification.accuracy_float32) <= ACCURACY_POINTS, verification
    assert f"wrote {path}" in stdout and "calibrated on 240 images" in stdout


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None, reason="the tflite extra (litert-torch) is not installed")
def test_digits_model_in_full_integer_tflite_is_within_a_point_of_float32(pretrained, digits_int8, tmp_path, record_property):  # noqa: F811
    checkpoint, images = parity.load(pretrained / "model.msgpack"), digits_int8[2]
    dst = tmp_path / "digits.tflite"
    _, verification = export.export_int8(checkpoint, dst, images)
    for name, value in vars(verification).items():
        record_property(f"tflite_{name}", float(value))
    assert abs(verification.accuracy_int8 - verification.accuracy_float32) <= ACCURACY_POINTS, verification
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(dst))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8  # full integer: its input too


def test_the_file_is_qdq_with_per_channel_int8_weights_and_uint8_activations(digits_int8):
    model = onnx.load(str(digits_int8[0]))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights, "no int8 convolution weights"
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {w.name for w in weights}]
    assert dequantized and all(scales[n.input[1]].ndim == 1 and scales[n.input[1]].size > 1 for n in dequantized)  # a scale per output channel
    activation_points = [scales[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert activation_points and all(point.dtype == np.uint8 for point in activation_points)


def test_images_are_prepared_as_train_eval_prepares_them_for_the_checkpoint(photo_run, photos):
    # --eval's images, normalised, are the very batch train.data's evaluation pipeline gives the
    # checkpoint (its resize, centre crop, mean and standard deviation): equal, not close.
    from train import data

    checkpoint = parity.load(photo_run / "model.msgpack")
    images = int8.load_images(str(photos), checkpoint.preprocessing, 64, count=8, evaluation=str(photos))
    recipe = data.recipe(None, 64, checkpoint.preprocessing)
    (batch,) = data.eval_batches(str(photos), resolution=64, global_batch_size=4 * PHOTO_EVAL, recipe=recipe)
    np.testing.assert_array_equal(int8.model_input(images.held_out, checkpoint.preprocessing, False, "NHWC"), batch["image"])
    np.testing.assert_array_equal(images.labels, batch["label"])
    assert images.calibration.shape == (8, 64, 64, 3) and images.calibration.dtype == np.uint8


# ---------------------------------------------------------------- the check refuses a broken quantization


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "v2.msgpack"
    parity.save(parity.load(random_torch_model("v2", 0.35, 10, seed=3)), path)
    return path


def test_a_quantization_calibrated_on_other_images_is_refused_and_nothing_written(pretrained, digits_int8, tmp_path):  # noqa: F811
    # Calibrated on flat grey images, every activation range is a sliver of what digits give:
    # real digits saturate it, and the top-1 class moves on a large share of them.
    checkpoint, images = parity.load(pretrained / "model.msgpack"), digits_int8[2]
    grey = np.full_like(images.calibration[:16], 128)
    dst = tmp_path / "model.onnx"
    with pytest.raises(export.ExportError, match="below --min-agreement 0.9: nothing written"):
        export.export_int8(checkpoint, dst, int8.Images(grey, images.held_out, images.labels, "digits"))
    assert not dst.exists() and not list(tmp_path.glob(".model.onnx*"))


# ---------------------------------------------------------------- mistakes, in one line


def _fails(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_:
        export.main(argv)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--int8"], ["--int8 needs --calibration DATA"]),
        (["--calibration", "digits"], ["--calibration is for --int8"]),
        (["--int8", "--calibration", "{tmp}/empty"], ["no images in it", ".jpg"]),
        (["--int8", "--calibration", "{tmp}/missing/"], ["no such folder"]),
        (["--int8", "--calibration", "{tmp}/two"], ["its 2 images all calibrate", "--eval"]),
        (["--int8", "--calibration", "digits", "--calibration-images", "0"], ["at least 1"]),
        (["--int8", "--calibration", "digits", "--min-agreement", "1.5"], ["between 0 and 1"]),
    ],
)
def test_bad_int8_input_is_one_line_exit_2_and_no_file(random_weights, tmp_path, capsys, args, fragments):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "two").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (i, 0, 0)).save(tmp_path / "two" / f"{i}.png")
    _fails(capsys, [str(random_weights), str(tmp_path / "model.onnx"), *(a.format(tmp=tmp_path) for a in args)], *fragments)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(
    "dst, fragments",
    [
        ("model.stablehlo", ["--int8 is not available for StableHLO", ".onnx, .tflite"]),
        ("model.pb", ["unknown extension '.pb'"]),
    ],
)
def test_int8_for_a_runtime_without_an_int8_path_is_one_line(random_weights, tmp_path, capsys, dst, fragments):
    _fails(capsys, [str(random_weights), str(tmp_path / dst), "--int8", "--calibration", "digits"], *fragments)
    assert not (tmp_path / dst).exists()


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is not None, reason="the tflite extra is installed here")
def test_int8_tflite_without_the_tflite_extra_says_what_to_install(random_weights, tmp_path, capsys):
    _fails(capsys, [str(random_weights), str(tmp_path / "model.tflite"), "--int8", "--calibration", "digits"], "pip install 'flax-mobilenet[tflite]'")
    assert not (tmp_path / "model.tflite").exists()
