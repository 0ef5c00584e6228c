"""Export a MobileNet to a deployment runtime; each file runs in its runtime before it is kept.

    python -m parity.export workdir/model.pth model.onnx
    python -m parity.export model.msgpack model.stablehlo --with-preprocessing
    python -m parity.export mobilenetv2_100.pth model.tflite
    python -m parity.export workdir/model.msgpack model_int8.onnx --int8 --calibration photos/ --eval photos/

SRC is anything `parity.load` reads (.msgpack, .pth, .safetensors, .keras, a Hugging Face
directory); the format follows from DST's extension. Every file takes a dynamic batch of square
images of the checkpoint's crop size (--resolution) and gives logits (batch, classes):

    .onnx       float32 NCHW (batch, 3, H, W): torch_ref through torch.onnx.export, run in onnxruntime
    .stablehlo  float32 NHWC (batch, H, W, 3): jax.export of the Flax model in eval mode, run by
                jax.export.deserialize(data).call(images); no custom call, so it runs without this
                project's native kernels (or this project)
    .tflite     float32 NCHW (batch, 3, H, W): torch_ref through litert-torch, run in LiteRT's
                interpreter; the file says batch 1, other batches through resize_tensor_input

--with-preprocessing: the model takes uint8 RGB, 0..255, in the same layout, and normalises it as
the checkpoint's preprocessing says ((x / 255 - mean) / std, as `Checkpoint.preprocess` computes
it); resizing and cropping stay outside (`parity.preprocess.resize_and_crop`).

--int8 --calibration DATA: static post-training quantization, calibrated on --calibration-images
images of DATA (a folder of images, or a dataset train.main reads: 'digits', a TFDS name, DIR with
train/ and val/, whose training split calibrates), each resized, centre-cropped and normalised as
the checkpoint's preprocessing says.
    .onnx       onnxruntime's tools: quant_pre_process, then quantize_static in QDQ format,
                per-channel symmetric int8 weights, uint8 activations, MinMax calibration
    .tflite     full-integer, through litert-torch's PT2E quantizer: per-channel symmetric int8
                weights, int8 activations (histogram calibration), int8 input and output
The int8 file then runs in its runtime beside the float32 one on held-out images (--eval's
evaluation split, else DATA's, else DATA's images the calibration did not take): their top-1
agreement, the logits' relative L2 and, with --eval, both accuracies are reported, and a file
whose agreement is below --min-agreement is not kept.

Class names (the checkpoint's, or --labels FILE, one per line) go into an .onnx file's
metadata_props under "labels", as a JSON list; .stablehlo and .tflite files have no place this
exporter fills. --drop-background drops output 0 of Google's 1001-class models. The command says
what it read, inferred and replaced before it exports.

Before anything is written the file runs in its runtime on a random batch, whole and one image,
against the Flax model on the same (normalised) images: the relative L2 of the logits must be at
most --tolerance. A mistake (unreadable source, unknown extension, runtime not installed, an export
or a check that fails) gives one `error: ...` line and exit 2, and no output file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from mobilenet_arch import MIN_RESOLUTION
from parity import int8
from parity.checkpoint import Checkpoint, describe, load, load_torch
from parity.convert import add_label_flags, labels_written, print_origin
from parity.io import WeightsFileError
from parity.layouts import ConversionError
from parity.layouts.torchvision import add_head_activation_flag, head_activation_override
from parity.preprocess import normalisation, normalise  # what --with-preprocessing puts in the model, as Checkpoint.preprocess does it
from parity.models import DEFAULT_TOLERANCE, flax_logits, relative_l2
from toolkit.cli import ArgumentParser, atomic_write, fail, first_line

LABELS_KEY = "labels"  # an ONNX file's metadata_props entry for the class names
CHECK_BATCH = 3  # the check runs this batch, then its first image alone: a dynamic batch, both ways
# The one custom call a portable StableHLO module may hold: jax.export's own check of the symbolic
# batch at call time. Anything else would be a kernel that exists only where it was built.
PORTABLE_CUSTOM_CALLS = {"shape_assertion"}


class ExportError(ValueError):
    """An export that cannot be made or kept: the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    layout: str  # of the images the file takes: "NCHW" or "NHWC"
    runtime: str  # what runs it, as the check names it
    extra: str  # pip install 'flax-mobilenet[<extra>]' brings `modules`
    modules: tuple[str, ...]
    export: Callable[[Checkpoint, int, bool], bytes]
    load: Callable[[bytes], Callable[[np.ndarray], np.ndarray]]  # file -> (images -> logits)
    # (checkpoint, resolution, with_preprocessing, float32 file, calibration images in its layout)
    # -> int8 file; None where the format has no int8 path
    int8: Callable[[Checkpoint, int, bool, bytes, np.ndarray], bytes] | None = None
    int8_takes: str = ""  # what the int8 file takes and gives, as the command says
    # (file, class names) -> the file holding them, where the format has a place for them
    labels: Callable[[bytes, tuple[str, ...]], bytes] | None = None


# ---------------------------------------------------------------- preprocessing


def check_images(batch: int, resolution: int, with_preprocessing: bool, seed: int = 0) -> np.ndarray:
    """NHWC images to check an export on: uint8 RGB, or standard normal like normalised input."""
    rng = np.random.default_rng(seed)
    if with_preprocessing:
        return rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    return rng.standard_normal((batch, resolution, resolution, 3), dtype=np.float32)


# ---------------------------------------------------------------- the PyTorch side


def _torch_model(checkpoint: Checkpoint, with_preprocessing: bool):
    """torch_ref in eval mode, NCHW, with the normalisation in front where asked."""
    import torch

    model = load_torch(checkpoint)
    if not with_preprocessing:
        return model
    scale, shift = (torch.from_numpy(v).reshape(1, 3, 1, 1) for v in normalisation(checkpoint.preprocessing))

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        def forward(self, images):
            return self.model(images.to(torch.float32) * self.scale + self.shift)

    return Normalised().eval()


def _torch_example(batch: int, resolution: int, with_preprocessing: bool):
    import torch

    return torch.zeros((batch, 3, resolution, resolution), dtype=torch.uint8 if with_preprocessing else torch.float32)


def onnx_bytes(checkpoint: Checkpoint, resolution: int, with_preprocessing: bool) -> bytes:
    """An ONNX model (input "image", output "logits", dynamic "batch") through torch.export."""
    import torch

    model = _torch_model(checkpoint, with_preprocessing)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (_torch_example(2, resolution, with_preprocessing),),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def onnx_with_labels(data: bytes, labels: tuple[str, ...]) -> bytes:
    """The ONNX model `data` with the class names in its `metadata_props`, under LABELS_KEY as a
    JSON list (onnxruntime gives them back as `session.get_modelmeta().custom_metadata_map`)."""
    import onnx

    model = onnx.load_from_string(data)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, LABELS_KEY: json.dumps(list(labels))})
    return model.SerializeToString()


def onnx_labels(data: bytes) -> tuple[str, ...] | None:
    """The class names an exported ONNX file holds, or None."""
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return tuple(json.loads(props[LABELS_KEY])) if LABELS_KEY in props else None


def onnx_runner(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images})[0]


def tflite_bytes(checkpoint: Checkpoint, resolution: int, with_preprocessing: bool) -> bytes:
    """A LiteRT flatbuffer through litert-torch, traced at batch 1: its dynamic batch fails to
    lower (a symbolic shape reaches its JAX bridge), and LiteRT's interpreter resizes the input."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO lines on every conversion
    with _quiet():
        import litert_torch

        model = litert_torch.convert(_torch_model(checkpoint, with_preprocessing), (_torch_example(1, resolution, with_preprocessing),))
        return bytes(model.model_content())


def tflite_int8(checkpoint: Checkpoint, resolution: int, with_preprocessing: bool, data: bytes, calibration: np.ndarray) -> bytes:
    """Full-integer post-training quantization through litert-torch's PT2E quantizer: int8
    weights (symmetric, per channel) and activations (per tensor, calibrated by its default
    histogram observer), int8 input and output too (`tflite_runner` quantizes the images with the
    file's scale and zero point); traced at batch 1, as the float file."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    example = (_torch_example(1, resolution, with_preprocessing),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    model = prepare_pt2e(torch.export.export(_torch_model(checkpoint, with_preprocessing), example).module(), quantizer)
    with torch.no_grad():
        for image in calibration:  # one at a time: the program is traced at batch 1
            model(torch.from_numpy(image[None]))
    model = convert_pt2e(model, fold_quantize=False)
    return bytes(litert_torch.convert(model, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content())


def tflite_runner(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    (image,), (logits,) = interpreter.get_input_details(), interpreter.get_output_details()

    def run(images: np.ndarray) -> np.ndarray:
        if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
            interpreter.resize_tensor_input(image["index"], list(images.shape))
            interpreter.allocate_tensors()
        interpreter.set_tensor(image["index"], tflite_input(images, image))
        interpreter.invoke()
        return tflite_output(interpreter.get_tensor(logits["index"]), logits)

    interpreter.allocate_tensors()
    return run


def tflite_input(x: np.ndarray, tensor: dict) -> np.ndarray:
    """`x` as the interpreter's input `tensor` takes it: as it is, or (a full-integer model's
    int8 input) x / scale + zero point, rounded and clipped, as LiteRT's guide does."""
    if tensor["dtype"] == x.dtype or np.issubdtype(tensor["dtype"], np.floating):
        return np.ascontiguousarray(x, tensor["dtype"])
    scale, zero_point = tensor["quantization"]
    info = np.iinfo(tensor["dtype"])
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(tensor["dtype"])


def tflite_output(y: np.ndarray, tensor: dict) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating):
        return y.copy()
    scale, zero_point = tensor["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


# ---------------------------------------------------------------- the JAX side


# The implementations an exported module is traced with: no native kernel (it exists only where
# it was built), and the pure-JAX "shifted" depthwise convolution rather than XLA's grouped one,
# which XLA:CPU runs tens of times slower (`python -m bench --depthwise`).
EXPORT_BACKEND = {"FLAX_MOBILENET_DEPTHWISE": "shifted", "FLAX_MOBILENET_BATCHNORM": "xla", "FLAX_MOBILENET_DENSE": "xla"}


def stablehlo_exported(checkpoint: Checkpoint, resolution: int, with_preprocessing: bool):
    """`jax.export.Exported` of the eval-mode model, NHWC, symbolic batch, the weights inside."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from flax_mobilenet import backend

    scale, shift = normalisation(checkpoint.preprocessing)

    def forward(images):
        x = images.astype(jnp.float32) * scale + shift if with_preprocessing else images
        return checkpoint.model.apply(checkpoint.variables, x, train=False)

    (batch,) = export.symbolic_shape("batch")
    dtype = jnp.uint8 if with_preprocessing else jnp.float32
    with backend.chosen(EXPORT_BACKEND):
        exported = export.export(jax.jit(forward))(jax.ShapeDtypeStruct((batch, resolution, resolution, 3), dtype))
    calls = custom_calls(exported.mlir_module()) - PORTABLE_CUSTOM_CALLS
    if calls:
        raise ExportError(f"the exported module calls {', '.join(sorted(calls))}, which exist only where they were built: report this as a bug")
    return exported


def custom_calls(mlir_text: str) -> set[str]:
    """The targets of the custom calls in a StableHLO module's text, in either print form."""
    return set(re.findall(r"custom_call @([\w.$-]+)", mlir_text)) | set(re.findall(r'call_target_name = "([^"]+)"', mlir_text))


def stablehlo_bytes(checkpoint: Checkpoint, resolution: int, with_preprocessing: bool) -> bytes:
    return bytes(stablehlo_exported(checkpoint, resolution, with_preprocessing).serialize())


def stablehlo_runner(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    from jax import export

    exported = export.deserialize(bytearray(data))
    return lambda images: np.asarray(exported.call(images))


FORMATS = {
    ".onnx": Format(
        "ONNX",
        "NCHW",
        "onnxruntime",
        "deploy",
        ("onnx", "onnxscript", "onnxruntime"),
        onnx_bytes,
        onnx_runner,
        int8.onnx_int8,
        "the float32 file's input, float32 logits",
        onnx_with_labels,
    ),
    ".stablehlo": Format("StableHLO", "NHWC", "jax.export", "deploy", (), stablehlo_bytes, stablehlo_runner),
    ".tflite": Format(
        "TFLite",
        "NCHW",
        "LiteRT",
        "tflite",
        ("litert_torch", "ai_edge_litert"),
        tflite_bytes,
        tflite_runner,
        tflite_int8,
        "int8 input and logits, quantized with the scale and zero point the file gives (parity.export.tflite_input, tflite_output)",
    ),
}


# ---------------------------------------------------------------- export and check


def format_of(path: str | os.PathLike) -> Format:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        expected = ", ".join(f"{s} ({f.name}, {f.layout})" for s, f in FORMATS.items())
        raise ExportError(f"{path}: unknown extension {suffix or '(none)'!r}: expected {expected}")
    return FORMATS[suffix]


def check_installed(fmt: Format) -> None:
    """ExportError naming the extra to install where a module the format needs is missing."""
    import importlib.util

    missing = [m for m in fmt.modules if importlib.util.find_spec(m) is None]
    if missing:
        which = "which is" if len(missing) == 1 else "which are"
        raise ExportError(f"exporting to {fmt.name} needs {' and '.join(missing)}, {which} not installed: pip install 'flax-mobilenet[{fmt.extra}]'")


def check(fmt: Format, data: bytes, checkpoint: Checkpoint, resolution: int, with_preprocessing: bool) -> float:
    """The largest relative L2 between the file's logits in its runtime and the Flax model's, on a
    random batch of CHECK_BATCH and on its first image alone."""
    images = check_images(CHECK_BATCH, resolution, with_preprocessing)
    reference = flax_logits(checkpoint.model, checkpoint.variables, normalise(images, checkpoint.preprocessing) if with_preprocessing else images)
    run = fmt.load(data)
    inputs = images if fmt.layout == "NHWC" else np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    # np.max, not max: a NaN in either run must carry through (max(0.1, nan) is 0.1)
    return float(np.max([relative_l2(run(inputs[:n]), reference[:n]) for n in (CHECK_BATCH, 1)]))


def export(
    checkpoint: Checkpoint,
    path: str | os.PathLike,
    resolution: int | None = None,
    with_preprocessing: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> float:
    """Write `checkpoint` to `path` in the format its extension names, once it ran in its runtime
    within `tolerance` (relative L2) of the Flax model; returns that error. ExportError otherwise,
    and nothing is written."""
    fmt = format_of(path)
    check_installed(fmt)
    data, error = checked_float32(fmt, checkpoint, path, resolution or checkpoint.preprocessing.crop_size, with_preprocessing, tolerance)
    atomic_write(path, lambda f: f.write(data))
    return error


def checked_float32(fmt: Format, checkpoint: Checkpoint, path, resolution: int, with_preprocessing: bool, tolerance: float) -> tuple[bytes, float]:
    """The float32 file in `fmt` and its relative L2 to the Flax model, once it is within
    `tolerance`; ExportError otherwise."""
    try:
        data = labelled(fmt, checkpoint, fmt.export(checkpoint, resolution, with_preprocessing))
    except ExportError:
        raise
    except Exception as e:  # the exporters raise their own types, with pages of context
        raise ExportError(f"{path}: the {fmt.name} export failed: {first_line(e)}") from e
    try:
        with _quiet():  # LiteRT's interpreter announces its CPU delegate on stdout
            error = check(fmt, data, checkpoint, resolution, with_preprocessing)
    except Exception as e:
        raise ExportError(f"{path}: the {fmt.name} file did not run in {fmt.runtime}: {first_line(e)}") from e
    if not error <= tolerance:  # a NaN fails too
        raise ExportError(
            f"{path}: {fmt.runtime}'s logits are {error:.3g} from the Flax model's (relative L2), above the bound {tolerance:g}: nothing written"
        )
    return data, error


def labelled(fmt: Format, checkpoint: Checkpoint, data: bytes) -> bytes:
    """`data` with the checkpoint's class names in it, where the format has a place for them."""
    return fmt.labels(data, checkpoint.labels) if fmt.labels is not None and checkpoint.labels else data


def check_int8(fmt: Format, path) -> None:
    """ExportError where `fmt` has no int8 path, or its runtime is not installed."""
    check_installed(fmt)
    if fmt.int8 is None:
        available = ", ".join(s for s, f in FORMATS.items() if f.int8 is not None)
        raise ExportError(f"{path}: --int8 is not available for {fmt.name}: it writes {available} (quantized through its runtime's own tools)")


def export_int8(
    checkpoint: Checkpoint,
    path: str | os.PathLike,
    images: int8.Images,
    resolution: int | None = None,
    with_preprocessing: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    min_agreement: float = int8.DEFAULT_MIN_AGREEMENT,
) -> tuple[float, int8.Verification]:
    """Write `checkpoint` to `path` quantized to int8, calibrated on `images.calibration`, once the
    float32 file passed `export`'s check and the int8 file's top-1 class is the float32 file's on
    at least `min_agreement` of `images.held_out` (both in the runtime); returns the float32 file's
    relative L2 to the Flax model and the int8 file's verification. ExportError otherwise, and
    nothing is written."""
    fmt = format_of(path)
    check_int8(fmt, path)
    resolution = resolution or checkpoint.preprocessing.crop_size
    data, error = checked_float32(fmt, checkpoint, path, resolution, with_preprocessing, tolerance)

    def prepare(images_nhwc: np.ndarray) -> np.ndarray:
        return int8.model_input(images_nhwc, checkpoint.preprocessing, with_preprocessing, fmt.layout)

    try:
        with _quiet():  # the quantizer logs each step
            quantized = labelled(fmt, checkpoint, fmt.int8(checkpoint, resolution, with_preprocessing, data, prepare(images.calibration)))
    except Exception as e:
        raise ExportError(f"{path}: the int8 quantization failed: {first_line(e)}") from e
    try:
        verification = int8.verify(fmt.load(data), fmt.load(quantized), prepare(images.held_out), images.labels)
    except Exception as e:
        raise ExportError(f"{path}: the int8 file did not run in {fmt.runtime}: {first_line(e)}") from e
    if not verification.agreement >= min_agreement:
        raise ExportError(
            f"{path}: the int8 model's top-1 class is the float32 model's on {verification.agreement:.1%} of {verification.images} held-out images "
            f"({images.held_out_from}), below --min-agreement {min_agreement:g}: nothing written; calibrate on more images like those it will see"
        )
    atomic_write(path, lambda f: f.write(quantized))
    return error, verification


def signature(fmt: Format, checkpoint: Checkpoint, resolution: int, with_preprocessing: bool) -> str:
    """What the file takes and gives, as --help and the docs say it."""
    shape = "(batch, 3, {r}, {r})" if fmt.layout == "NCHW" else "(batch, {r}, {r}, 3)"
    takes = "uint8 RGB 0..255" if with_preprocessing else "float32 normalised"
    return f"{takes} {fmt.layout} {shape.format(r=resolution)} -> logits (batch, {checkpoint.architecture.num_classes})"


@contextlib.contextmanager
def _quiet():
    """Silence a library that prints progress and C++ log lines to the process's stdout and stderr:
    both file descriptors go to a temporary file for the block (an error still raises)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    description, rest = __doc__.split("\n\n", 1)
    parser = ArgumentParser(prog="python -m parity.export", description=description, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="weights to read: .msgpack, .pth, .pt, .bin, .safetensors, .keras, .h5 or a Hugging Face directory")
    parser.add_argument("dst", help=f"the file to write: {', '.join(FORMATS)}")
    parser.add_argument("--resolution", type=int, help="input height and width (default: the checkpoint's crop size, 224 for most)")
    add_head_activation_flag(parser)
    parser.add_argument("--with-preprocessing", action="store_true", help="take uint8 RGB (0..255) and normalise inside the model")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative L2 between the runtime's and the Flax model's logits")
    quantized = parser.add_argument_group("int8 (.onnx, .tflite)")
    quantized.add_argument(
        "--int8",
        action="store_true",
        help="quantize to int8, statically: .onnx through onnxruntime's quant_pre_process and quantize_static (QDQ format, per-channel symmetric int8 weights, "
        "uint8 activations, MinMax calibration); .tflite full-integer through litert-torch's PT2E quantizer",
    )
    quantized.add_argument("--calibration", metavar="DATA", help="images to calibrate on: a folder of images, or a dataset train.main reads (its training split)")
    quantized.add_argument(
        "--calibration-images",
        type=int,
        default=int8.DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help=f"how many of DATA's images calibrate (default {int8.DEFAULT_CALIBRATION_IMAGES}: MinMax ranges settle within a few hundred)",
    )
    quantized.add_argument("--eval", metavar="DATASET", help="labelled held-out images, the evaluation split of a dataset train.eval reads: both models' accuracy on it is reported")
    quantized.add_argument(
        "--min-agreement",
        type=float,
        default=int8.DEFAULT_MIN_AGREEMENT,
        help=f"least share of held-out images on which the int8 model's top-1 class is the float32 model's (default {int8.DEFAULT_MIN_AGREEMENT:g}: "
        "a sound quantization changes only near-tied predictions, a broken one many)",
    )
    quantized.add_argument("--data-dir", help="TFDS data directory, where DATA or DATASET is a TFDS name")
    add_label_flags(parser)
    return parser.parse_args(argv)


def int8_flag_problem(args) -> str | None:
    """What is wrong with the int8 flags on their own."""
    given = [flag for flag, value in (("--calibration", args.calibration), ("--eval", args.eval)) if value is not None]
    if not args.int8:
        return f"{given[0]} is for --int8: add --int8, or leave it out" if given else None
    if args.calibration is None:
        return "--int8 needs --calibration DATA: images like those the model will see (a folder of images, or the dataset it was trained on)"
    if args.calibration_images < 1:
        return f"--calibration-images {args.calibration_images}: expected at least 1"
    if not 0 <= args.min_agreement <= 1:
        return f"--min-agreement {args.min_agreement:g}: expected a share between 0 and 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resolution is not None and args.resolution < MIN_RESOLUTION:
        fail(f"--resolution {args.resolution} is below {MIN_RESOLUTION}, the networks' total stride: use at least {MIN_RESOLUTION}")
    problem = int8_flag_problem(args)
    if problem:
        fail(problem)
    verification = None
    try:
        fmt = format_of(args.dst)
        if not Path(args.dst).resolve().parent.is_dir():
            raise ExportError(f"cannot write {args.dst}: directory {Path(args.dst).parent} does not exist")
        if args.int8:
            check_int8(fmt, args.dst)
        else:
            check_installed(fmt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                checkpoint = load(args.src, labels=args.labels, drop_background=args.drop_background, **head_activation_override(args))
            except ConversionError as e:
                raise ConversionError(f"{args.src}: {e}") from e
        print_origin(args.src, checkpoint, caught)
        resolution = args.resolution or checkpoint.preprocessing.crop_size
        if args.int8:
            images = int8.load_images(args.calibration, checkpoint.preprocessing, resolution, args.calibration_images, args.eval, args.data_dir)
            error, verification = export_int8(checkpoint, args.dst, images, resolution, args.with_preprocessing, args.tolerance, args.min_agreement)
        else:
            error = export(checkpoint, args.dst, resolution, args.with_preprocessing, args.tolerance)
    except (ExportError, WeightsFileError, ConversionError, OSError, ValueError) as e:  # ValueError: train.data's DataError, int8's CalibrationError
        fail(str(e))
    print(
        f"wrote {args.dst}: {describe(checkpoint.architecture)}; takes {signature(fmt, checkpoint, resolution, args.with_preprocessing)}; "
        f"{fmt.runtime} vs Flax: relative L2 {error:.2g} at batch {CHECK_BATCH} and 1 (bound {args.tolerance:g})"
        + ("" if verification is None else "; the float32 model, before int8 quantization")
        + f"; {labels_written(checkpoint, fmt.labels is not None, fmt.name)}"
    )
    if verification is not None:
        print(
            f"int8: takes {fmt.int8_takes}; calibrated on {len(images.calibration)} images of {args.calibration}; against the float32 model in {fmt.runtime}, "
            f"{verification.summary()} ({images.held_out_from}; bound {args.min_agreement:g})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
