"""Int8 post-training quantization of an exported model: calibrated on the user's images, prepared
as the checkpoint's preprocessing says, and checked against the float32 file on held-out images.

ONNX goes through onnxruntime's own tools: `quant_pre_process` (shape inference and graph
optimisation, which folds what the exporter left unfolded, so that every Conv and Gemm can be
quantized), then `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs, which
onnxruntime's CPU kernels fuse into integer convolutions and which other ONNX runtimes read),
per-channel symmetric int8 weights (a MobileNet's depthwise filters differ in scale channel by
channel by orders of magnitude: one scale per tensor leaves the small ones a few levels), uint8
activations (onnxruntime's x86 guidance for U8S8), MinMax calibration (the observed range of each
activation over the calibration images; ReLU6 bounds most of them, so nothing is worth clipping).
TFLite's full-integer path goes through litert-torch, beside the float32 TFLite export
(`parity.export.tflite_int8`).

The images come from the training pipeline (`train.data`, `train.folder`): resized and centre
cropped as evaluation does (`train.data.recipe` of the checkpoint's preprocessing), normalised by
`train.augment.normalize` with its mean and standard deviation. No second image pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from parity.layouts import Preprocessing
from parity.models import relative_l2

# Images the calibration reads by default. MinMax ranges settle within a few hundred images (the
# TFLite and onnxruntime guides ask for roughly 100 to 500 representative samples); more only
# costs time, fewer leaves a rare large activation unseen, to saturate at inference.
DEFAULT_CALIBRATION_IMAGES = 256
# The share of held-out images on which the int8 file's top-1 class must be the float32 file's.
# A sound quantization changes a prediction only where float32 itself is nearly tied between two
# classes: a point or two of images (its accuracy moves by about a point, see docs/deploy.md). A
# broken one (calibrated on images prepared otherwise, ranges saturated) disagrees on a large share
# of them. 0.9 separates the two with room for models with many near-ties.
DEFAULT_MIN_AGREEMENT = 0.9
# Held-out images checked where no labelled evaluation set is given: a 1-point share of them is
# 5 images, enough to tell a sound quantization from a broken one.
HELD_OUT_IMAGES = 500
CALIBRATION_BATCH = 8  # images per calibration step: memory, not the ranges, depends on it
RUN_BATCH = 50  # images per call when the check runs the two files
SEED = 0  # which images calibrate, when the source holds more than asked


class CalibrationError(ValueError):
    """Calibration or check images that cannot be had: the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class Images:
    """uint8 RGB NHWC images, resized and cropped as the checkpoint's preprocessing says."""

    calibration: np.ndarray
    held_out: np.ndarray
    labels: np.ndarray | None  # of held_out, where they are labelled (an evaluation split)
    held_out_from: str  # where the held-out images are from, as the report says


@dataclasses.dataclass(frozen=True)
class Verification:
    """The int8 file against the float32 file on the held-out images."""

    images: int
    agreement: float  # share of images with the same top-1 class
    relative_l2: float  # of all the logits, ||int8 - float32|| / ||float32||
    accuracy_float32: float | None  # where the images are labelled
    accuracy_int8: float | None

    def summary(self) -> str:
        accuracy = "" if self.accuracy_float32 is None else f"; accuracy float32 {self.accuracy_float32:.4f}, int8 {self.accuracy_int8:.4f}"
        return f"top-1 agreement {self.agreement:.4f} on {self.images} held-out images, logits' relative L2 {self.relative_l2:.3g}{accuracy}"


# ---------------------------------------------------------------- the images


def load_images(
    calibration: str,
    preprocessing: Preprocessing,
    resolution: int,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    evaluation: str | None = None,
    data_dir: str | None = None,
) -> Images:
    """`count` calibration images from `calibration`, and held-out images to check on.

    `calibration` is a folder of images (any layout, subfolders followed) or a dataset train.main
    reads ('digits', a TFDS name, a folder with train/ and val/): a dataset calibrates on its
    training split. The held-out images are `evaluation`'s evaluation split (labelled: a dataset
    train.eval reads), else the calibration dataset's evaluation split, else the folder's images
    the calibration did not take (at most HELD_OUT_IMAGES of either of the last two).
    """
    from train import data, folder
    from train.datasets import dataset_problem, is_folder

    for flag, source in (("--calibration", calibration), ("--eval", evaluation)):
        if source is not None and is_folder(source) and not os.path.isdir(source):
            raise CalibrationError(f"{flag} {source}: no such folder; expected a folder of images, or a dataset train.main reads")
    recipe = data.recipe(None, resolution, preprocessing)
    rng = np.random.default_rng(SEED)
    if os.path.isdir(calibration) and not os.path.isdir(os.path.join(calibration, "train")):  # a folder of images, not a dataset
        paths = folder.image_files(calibration)
        if not paths:
            raise CalibrationError(f"--calibration {calibration}: no images in it: expected files ending in {' '.join(folder.IMG_EXTENSIONS)} (any case, subfolders followed)")
        folder.check_images(paths)
        order = rng.permutation(len(paths))
        chosen, rest = order[:count], order[count : count + HELD_OUT_IMAGES]
        calibrating = np.stack([folder.eval_example((paths[i], 0), recipe)["image"] for i in chosen])
        held_out, labels, held_out_from = None, None, f"{calibration} (the images the calibration did not take)"
        if len(rest) and evaluation is None:
            held_out = np.stack([folder.eval_example((paths[i], 0), recipe)["image"] for i in rest])
    else:
        problem = dataset_problem(calibration, data_dir)
        if problem:
            raise CalibrationError(problem.replace("--dataset", "--calibration"))
        train = data.eval_examples(calibration, "train", resolution=resolution, data_dir=data_dir, recipe=recipe)
        calibrating, _ = _take(train, rng.permutation(len(train))[:count])
        split = data.eval_examples(calibration, "eval", resolution=resolution, data_dir=data_dir, recipe=recipe)
        held_out, labels = _take(split, rng.permutation(len(split))[:HELD_OUT_IMAGES])
        held_out_from = f"{calibration}'s evaluation split"
    if evaluation is not None:
        problem = dataset_problem(evaluation, data_dir)
        if problem:
            raise CalibrationError(problem.replace("--dataset", "--eval"))
        split = data.eval_examples(evaluation, "eval", resolution=resolution, data_dir=data_dir, recipe=recipe)
        held_out, labels = _take(split, range(len(split)))
        held_out_from = f"{evaluation}'s evaluation split"
    if held_out is None:
        raise CalibrationError(
            f"--calibration {calibration}: its {len(calibrating)} images all calibrate, none is left to check the int8 model on: "
            "give --eval DATASET (labelled images), or more images than --calibration-images"
        )
    return Images(calibrating, held_out, labels, held_out_from)


def _take(examples, indices) -> tuple[np.ndarray, np.ndarray]:
    chosen = [examples[int(i)] for i in indices]
    return np.stack([e["image"] for e in chosen]), np.asarray([e["label"] for e in chosen])


def model_input(images: np.ndarray, preprocessing: Preprocessing, with_preprocessing: bool, layout: str) -> np.ndarray:
    """The images as the exported file takes them: uint8 where it normalises them itself, else
    normalised as the training pipeline normalises them; NCHW or NHWC."""
    from train import augment

    x = images if with_preprocessing else augment.normalize(images, preprocessing.mean, preprocessing.std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)


# ---------------------------------------------------------------- ONNX


def onnx_int8(checkpoint, resolution: int, with_preprocessing: bool, data: bytes, calibration: np.ndarray) -> bytes:
    """The float32 ONNX model `data`, statically quantized (see the module's docstring), calibrated
    on `calibration` (the model's input: its input name "image", its layout)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {"image": calibration[start : start + CALIBRATION_BATCH]}

    with tempfile.TemporaryDirectory() as folder:
        float32, prepared, int8 = (Path(folder) / name for name in ("float32.onnx", "prepared.onnx", "int8.onnx"))
        float32.write_bytes(data)
        quant_pre_process(float32, prepared)
        quantize_static(
            prepared,
            int8,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return int8.read_bytes()


# ---------------------------------------------------------------- the check


def verify(float32, int8, images: np.ndarray, labels: np.ndarray | None) -> Verification:
    """`float32` and `int8` (images -> logits, in the file's layout) on the same `images`."""
    batches = [slice(start, start + RUN_BATCH) for start in range(0, len(images), RUN_BATCH)]
    reference = np.concatenate([float32(images[b]) for b in batches])
    quantized = np.concatenate([int8(images[b]) for b in batches])
    predicted, predicted_int8 = reference.argmax(-1), quantized.argmax(-1)
    accuracy = (lambda p: float(np.mean(p == labels))) if labels is not None else (lambda p: None)
    return Verification(
        images=len(images),
        agreement=float(np.mean(predicted == predicted_int8)),
        relative_l2=relative_l2(quantized, reference),
        accuracy_float32=accuracy(predicted),
        accuracy_int8=accuracy(predicted_int8),
    )
