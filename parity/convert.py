"""Convert MobileNet weights between layouts: torchvision, timm, Hugging Face, Keras and Flax.

    python -m parity.convert mobilenetv2_100.pth mobilenet_v2.msgpack --verify
    python -m parity.convert google_mobilenet_v2_1.0_224/ model.msgpack
    python -m parity.convert model.msgpack hf_dir --layout hf

The source's layout, architecture, width, depth, classes and padding are read from the weights
(`parity.load`); the output's layout follows from its name (.msgpack Flax, .pth/.pt/.safetensors
torchvision, .keras/.weights.h5 Keras, a directory Hugging Face) or `--layout`. `--arch` and
`--width` are checks: weights that disagree are an error. `--verify` runs the source library
itself where it is installed (timm, transformers, keras; torch_ref for torchvision weights) on the
source and the Flax model on the converted weights, on one random batch, prints how far apart the
logits are, and exits 1 above the tolerance (nothing is written then). Bad input gives one
`error: ...` line and exit 2, and never leaves an output file behind.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import mobilenet_arch
from toolkit.cli import ArgumentParser, fail
from parity.checkpoint import Checkpoint, describe, layout_for_path, load, load_torch, save
from parity.io import WeightsFileError
from parity.layouts import ConversionError
from parity.models import relative_l2
from parity.random_weights import random_batch

LAYOUT_NAMES = ("torchvision", "timm", "hf", "keras", "flax")
# Logits of the libraries and the Flax model differ by float32 rounding only (1e-7 to 1e-5
# relative L2 measured over the layouts' tests); the tests hold the models to the same bound.
DEFAULT_TOLERANCE = 1e-5
MIN_RESOLUTION = 32  # the networks' total stride: smaller inputs end as 1x1 maps of padding


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m parity.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="weights to read: .pth, .pt, .bin, .safetensors, .msgpack, .keras, .h5 or a Hugging Face directory")
    parser.add_argument("dst", help="where to write: .pth, .pt, .safetensors, .msgpack, .keras, .weights.h5 or a directory")
    parser.add_argument("--layout", choices=LAYOUT_NAMES, help="the output's layout (default: from its name)")
    parser.add_argument("--arch", choices=mobilenet_arch.ARCHS, help="check that the weights are this architecture")
    parser.add_argument("--width", type=float, help="check that the weights have this width multiplier")
    parser.add_argument("--verify", action="store_true", help="compare the source library's and the Flax model's logits")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative L2 error --verify accepts")
    parser.add_argument("--resolution", type=int, default=224, help="input size of the --verify batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.width is not None and not args.width > 0:
        fail(f"width_mult must be positive, got {args.width}")
    if args.resolution < MIN_RESOLUTION:
        fail(f"--resolution {args.resolution} is below {MIN_RESOLUTION}, the networks' total stride: use at least {MIN_RESOLUTION}")
    overrides = {k: v for k, v in (("arch", args.arch), ("width_mult", args.width)) if v is not None}
    try:
        dst = Path(args.dst)
        if Path(args.src).resolve() == dst.resolve():
            raise WeightsFileError(f"{args.dst}: the destination is the source; write to a new file")
        if not dst.resolve().parent.is_dir():
            raise WeightsFileError(f"cannot write {args.dst}: directory {dst.parent} does not exist")
        layout = args.layout or layout_for_path(dst)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                checkpoint = load(args.src, **overrides)
            except ConversionError as e:
                raise ConversionError(f"{args.src}: {e}") from e
        for w in caught:
            print(f"note: {args.src}: {w.message}")
        if args.verify and not verify(args.src, checkpoint, args):
            return 1
        save(checkpoint, dst, layout=layout)
    except (WeightsFileError, ConversionError, OSError) as e:
        fail(str(e))
    print(f"wrote {args.dst}: {describe(checkpoint.architecture)} ({checkpoint.layout} -> {layout})")
    return 0


def verify(src: str, checkpoint: Checkpoint, args) -> bool:
    """The source library's logits on the source weights against the Flax model's."""
    x = random_batch(2, args.resolution)
    library, reference = source_logits(src, checkpoint, x)
    got = np.asarray(checkpoint.model.apply(checkpoint.variables, x, train=False))
    error, max_abs = relative_l2(got, reference), float(np.max(np.abs(got - reference)))
    ok = error <= args.tolerance
    print(
        f"verify: {library} (source) vs Flax (converted) logits on a random batch {x.shape} (NHWC): "
        f"max abs diff {max_abs:.3g}, relative L2 {error:.3g} (tolerance {args.tolerance:g}): "
        + ("ok" if ok else "FAILED, nothing written")
    )
    return ok


def source_logits(src: str, checkpoint: Checkpoint, x: np.ndarray) -> tuple[str, np.ndarray]:
    """(library name, logits) of the source weights run by their own library where installed."""
    import torch

    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if checkpoint.layout == "hf" and Path(src).is_dir():
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            transformers.logging.set_verbosity_error()
            model = transformers.AutoModelForImageClassification.from_pretrained(src).eval()
            with torch.no_grad():
                return "transformers", model(pixel_values=nchw).logits.numpy()
    if checkpoint.layout == "keras" and Path(src).suffix == ".keras":
        try:
            import os

            os.environ.setdefault("KERAS_BACKEND", "jax")
            import keras
        except ImportError:
            keras = None
        if keras is not None:
            return "keras", np.asarray(keras.saving.load_model(src)(x, training=False))
    if checkpoint.layout == "timm":
        model = timm_model(checkpoint)
        if model is not None:
            from parity.layouts import from_flax
            from parity.layouts import timm as timm_layout

            state = {k: torch.from_numpy(v) for k, v in from_flax(checkpoint.variables, timm_layout.rules(checkpoint.architecture)).items()}
            model.load_state_dict(state, strict=False)
            with torch.no_grad():
                return "timm", model.eval()(nchw).numpy()
    with torch.no_grad():
        return "torch_ref", load_torch(checkpoint)(nchw).numpy()


def timm_model(checkpoint: Checkpoint) -> Any:
    """The timm MobileNet whose state-dict shapes are the checkpoint's, or None."""
    try:
        import timm
    except ImportError:
        return None
    from parity.layouts import from_flax
    from parity.layouts import timm as timm_layout

    want = {k: v.shape for k, v in from_flax(checkpoint.variables, timm_layout.rules(checkpoint.architecture)).items()}
    for name in timm.list_models(f"mobilenet{checkpoint.architecture.arch}_*"):
        model = timm.create_model(name, num_classes=checkpoint.architecture.num_classes)
        have = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        if have == want:
            return model
    return None


if __name__ == "__main__":
    sys.exit(main())
