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
outputs are (like with like: probabilities where the library returns them, Keras's softmax),
and exits 1 above the tolerance (nothing is written then). Bad input gives one
`error: ...` line and exit 2, and never leaves an output file behind.

The class names travel with the weights where both layouts have a place for them (a Hugging Face
config's id2label, a .msgpack's description); `--labels FILE` (one name per line) gives them.
`--drop-background` drops output 0 of Google's 1001-class models (transformers' google/ checkpoints), giving
ImageNet's 1000. Before writing, the command says what it read, what it inferred (what the source
does not say) and what it replaced.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import mobilenet_arch
from mobilenet_arch import MIN_RESOLUTION
from parity.checkpoint import Checkpoint, describe, load, save
from parity.io import WeightsFileError
from parity.layouts import ConversionError
from parity.layouts.registry import LAYOUTS, NAMES, check_can_hold, layout_for_path
from parity.layouts.torchvision import add_head_activation_flag, head_activation_override, run_torch_ref
from parity.models import DEFAULT_TOLERANCE, relative_l2
from parity.random_weights import random_batch
from toolkit.cli import ArgumentParser, fail


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m parity.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="weights to read: .pth, .pt, .bin, .safetensors, .msgpack, .keras, .h5 or a Hugging Face directory")
    parser.add_argument("dst", help="where to write: .pth, .pt, .safetensors, .msgpack, .keras, .weights.h5 or a directory")
    parser.add_argument("--layout", choices=NAMES, help="the output's layout (default: from its name)")
    parser.add_argument("--arch", choices=mobilenet_arch.ARCHS, help="check that the weights are this architecture")
    parser.add_argument("--width", type=float, help="check that the weights have this width multiplier")
    add_head_activation_flag(parser)
    parser.add_argument("--ema", action="store_true", help="read a training checkpoint's EMA copy of the weights (state_dict_ema, model_ema)")
    add_label_flags(parser)
    parser.add_argument("--verify", action="store_true", help="compare the source library's and the Flax model's outputs")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative L2 error --verify accepts")
    parser.add_argument("--resolution", type=int, help="input size of the --verify batch (default: the model's fixed input size, else 224)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.width is not None and not args.width > 0:
        fail(f"width_mult must be positive, got {args.width}")
    if args.resolution is not None and args.resolution < MIN_RESOLUTION:
        fail(f"--resolution {args.resolution} is below {MIN_RESOLUTION}, the networks' total stride: use at least {MIN_RESOLUTION}")
    overrides = {k: v for k, v in (("arch", args.arch), ("width_mult", args.width)) if v is not None}
    overrides.update(head_activation_override(args))
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
                checkpoint = load(args.src, ema=args.ema, labels=args.labels, drop_background=args.drop_background, **overrides)
            except ConversionError as e:
                raise ConversionError(f"{args.src}: {e}") from e
        print_origin(args.src, checkpoint, caught)
        check_can_hold(layout, checkpoint.architecture)  # before any work: the hint names the layouts that can
        if not args.verify:
            save(checkpoint, dst, layout=layout)
        elif not (verify(args.src, checkpoint, args) and write_verified(checkpoint, dst, layout, args)):
            return 1
    except (WeightsFileError, ConversionError, OSError, ValueError) as e:  # ValueError: a description's own checks
        fail(str(e))
    print(f"wrote {args.dst}: {describe(checkpoint.architecture)} ({checkpoint.layout} -> {layout}); {labels_written(checkpoint, LAYOUTS[layout].holds_labels, layout)}")
    return 0


def add_label_flags(parser) -> None:
    """--labels and --drop-background, as convert and export take them."""
    parser.add_argument("--labels", metavar="FILE", help="the class names, one per line in the outputs' order, in place of the source's")
    parser.add_argument(
        "--drop-background", action="store_true", help="drop output 0 of a 1001-class model (Google's background class), leaving ImageNet's 1000"
    )


def print_origin(src: str, checkpoint: Checkpoint, caught) -> None:
    """What `load` read, inferred and replaced, and what it ignored (its warnings), a line each."""
    for line in checkpoint.origin:
        print(line)
    for w in caught:
        print(f"note: {src}: {w.message}")


def labels_written(checkpoint: Checkpoint, holds: bool, target: str) -> str:
    """Whether the class names went into the file, for the line that says what was written."""
    if not checkpoint.labels:
        return "no class names to write (--labels FILE gives them)"
    if holds:
        return f"{len(checkpoint.labels)} class names written"
    return f"the {len(checkpoint.labels)} class names not written: {target} files have no place for them"


def verify(src: str, checkpoint: Checkpoint, args) -> bool:
    """The source library's outputs on the source weights against the Flax model's (torch_ref's
    logits where the library cannot run the source)."""
    x = random_batch(2, resolution(checkpoint, args))
    ran = LAYOUTS[checkpoint.layout].run_library(src, checkpoint, x)
    if ran is not None:
        (library, reference), got = ran, flax_outputs(checkpoint, checkpoint.layout, x)
    else:
        (library, reference), got = run_torch_ref(src, checkpoint, x), checkpoint.logits(x)
    if args.drop_background and reference.shape[-1] == got.shape[-1] + 1:  # the source itself, with its background class
        reference = reference[:, 1:]
        if ran is not None and LAYOUTS[checkpoint.layout].returns_output and checkpoint.architecture.head.output == "softmax":
            # The softmax of the other 1000 logits: the source's probabilities without output 0, renormalised.
            reference = reference / reference.sum(axis=-1, keepdims=True)
    return report(f"{library} (source) vs Flax (converted)", got, reference, x, args.tolerance)


def resolution(checkpoint: Checkpoint, args) -> int:
    """The --verify batch's size: the user's, else the input size a fixed-input model was built
    for (a Keras model's, which runs at no other), else 224."""
    pre = checkpoint.preprocessing
    return args.resolution or (pre.crop_size if pre.resize == "whole" else 224)


def flax_outputs(checkpoint: Checkpoint, layout: str, x: np.ndarray) -> np.ndarray:
    """The Flax model's logits, through the head's output activation where `layout`'s library
    returns that (Keras's softmax): like is compared with like."""
    return checkpoint.outputs(x) if LAYOUTS[layout].returns_output else checkpoint.logits(x)


def write_verified(checkpoint: Checkpoint, dst: Path, layout: str, args) -> bool:
    """Write `dst` beside itself first, run the library it is written for on that file, and move
    it into place only if its outputs are the Flax model's."""
    x = random_batch(2, resolution(checkpoint, args), seed=1)
    parent = dst.resolve().parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".{dst.name}.") as staging:
        staged = Path(staging) / dst.name
        save(checkpoint, staged, layout=layout)
        ran = LAYOUTS[layout].run_written(staged, checkpoint, x)
        if ran is None:
            print(f"verify: the library {layout} files are for is not installed: {dst.name} was not run there")
        else:
            library, outputs = ran
            if not report(f"{library} on the written {dst.name} vs Flax", outputs, flax_outputs(checkpoint, layout, x), x, args.tolerance):
                return False
        # The description (a .msgpack's .json) before the file it describes: a reader that finds the
        # new file finds its description with it.
        for entry in sorted(Path(staging).iterdir(), key=lambda p: p.name != f"{dst.name}.json"):
            target = parent / entry.name
            if entry.is_dir() and target.is_dir():
                for inner in entry.iterdir():
                    os.replace(inner, target / inner.name)
            else:
                os.replace(entry, target)
    return True


def report(what: str, got: np.ndarray, reference: np.ndarray, x: np.ndarray, tolerance: float) -> bool:
    error, max_abs = relative_l2(got, reference), float(np.max(np.abs(got - reference)))
    ok = error <= tolerance
    print(
        f"verify: {what} outputs on a random batch {x.shape} (NHWC): max abs diff {max_abs:.3g}, relative L2 {error:.3g} "
        f"(tolerance {tolerance:g}): " + ("ok" if ok else "FAILED, nothing written")
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
