"""Convert MobileNet weights between PyTorch and Flax files.

    python -m parity.convert mobilenet_v2.pth mobilenet_v2.msgpack --arch v2 --width 1.0 --verify

The direction and the formats follow from the extensions: .pth/.pt (PyTorch state dict),
.safetensors (PyTorch keys) and .msgpack (Flax variables); a PyTorch-to-PyTorch format change works
too. `--verify` runs the source framework's model on the source weights and the other framework's
model on the converted ones, on one random batch, prints how far apart the logits are, and exits 1
above the tolerance (nothing is written then). Bad input gives one `error: ...` line and exit 2,
and never leaves an output file behind.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mobilenet_arch
import torch_ref
from mobilenet_arch.cli import ArgumentParser, architecture_or_fail, fail
from parity.io import (
    WeightsFileError,
    framework_of,
    load_as_flax,
    load_as_torch,
    load_flax_variables,
    load_torch_state_dict,
    save_flax_variables,
    save_torch_state_dict,
)
from parity.models import flax_logits, flax_model, relative_l2, torch_logits
from parity.random_weights import random_batch
from parity.weights import ConversionError, flax_to_torch, infer_width, num_classes_of, torch_to_flax

NAMES = {"torch": "PyTorch", "flax": "Flax"}
# Logits of the two frameworks differ by float32 rounding only (about 1e-6 relative L2 measured);
# the tests hold the models to the same bound.
DEFAULT_TOLERANCE = 1e-5


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m parity.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="weights to read: .pth, .pt, .safetensors or .msgpack")
    parser.add_argument("dst", help="file to write: .pth, .pt, .safetensors or .msgpack")
    parser.add_argument("--arch", required=True, choices=mobilenet_arch.ARCHS)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the weights (default 1.0)")
    parser.add_argument("--verify", action="store_true", help="compare both models' logits on a random batch")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative L2 error --verify accepts")
    parser.add_argument("--resolution", type=int, default=224, help="input size of the --verify batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    architecture_or_fail(args.arch, args.width)
    try:
        src, dst = framework_of(args.src), framework_of(args.dst)
        if Path(args.src).resolve() == Path(args.dst).resolve():
            raise WeightsFileError(f"{args.dst}: the destination is the source file; write to a new file")
        if not Path(args.dst).resolve().parent.is_dir():
            raise WeightsFileError(f"cannot write {args.dst}: directory {Path(args.dst).parent} does not exist")
        try:
            if src == "torch":
                state_dict = load_as_torch(args.src, args.arch, args.width)
                variables = torch_to_flax(state_dict, args.arch, args.width)
            else:
                variables = load_as_flax(args.src, args.arch, args.width)
                state_dict = flax_to_torch(variables, args.arch)
        except ConversionError as e:
            raise ConversionError(f"{args.src}: {e}{_hint(args.src, args.arch)}") from e
        num_classes = num_classes_of(state_dict, args.arch)
        if args.verify and not verify(state_dict, variables, args, source=src):
            return 1
        if dst == "torch":
            save_torch_state_dict(state_dict, args.dst)
        else:
            save_flax_variables(variables, args.dst)
    except (WeightsFileError, ConversionError, OSError) as e:
        fail(str(e))
    print(
        f"wrote {args.dst}: MobileNet{args.arch.upper()} width {args.width}, {num_classes} classes "
        f"({NAMES[src]} {Path(args.src).suffix} -> {NAMES[dst]} {Path(args.dst).suffix})"
    )
    return 0


def verify(state_dict: dict[str, torch.Tensor], variables: dict[str, Any], args, source: str) -> bool:
    """Logits of the PyTorch model (state_dict) and the Flax model (variables) on one batch."""
    num_classes = num_classes_of(state_dict, args.arch)
    torch_model = torch_ref.create_model(args.arch, args.width, num_classes)
    torch_model.load_state_dict(state_dict, strict=True)
    x = random_batch(2, args.resolution)
    torch_out = torch_logits(torch_model.eval(), x)
    flax_out = flax_logits(flax_model(args.arch, args.width, num_classes), variables, x)
    error, max_abs = relative_l2(flax_out, torch_out), float(np.max(np.abs(flax_out - torch_out)))
    roles = ("source", "converted") if source == "torch" else ("converted", "source")
    ok = error <= args.tolerance
    print(
        f"verify: PyTorch ({roles[0]}) vs Flax ({roles[1]}) logits on a random batch {x.shape} (NHWC): "
        f"max abs diff {max_abs:.3g}, relative L2 {error:.3g} (tolerance {args.tolerance:g}): "
        + ("ok" if ok else "FAILED, nothing written")
    )
    return ok


def _hint(path: str, arch: str) -> str:
    """What the file holds instead, when it fits the other architecture."""
    other = "v1" if arch == "v2" else "v2"
    try:
        if framework_of(path) == "torch":
            width = infer_width(load_torch_state_dict(path), other)
        else:
            width = infer_width(flax_to_torch(load_flax_variables(path), other), other)
    except (WeightsFileError, ConversionError):
        return ""
    return "" if width is None else f" (it holds MobileNet{other.upper()} width {width} weights: use --arch {other} --width {width})"


if __name__ == "__main__":
    sys.exit(main())
