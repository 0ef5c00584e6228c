"""Per-layer table of a MobileNet in the papers' columns, with parameters and multiply-adds.

    python -m flax_mobilenet.summary --arch v1 --width 0.5 --resolution 160

The rows come from `mobilenet_arch.layer_table` (the description every model is built from); the
total number of parameters is checked against the Flax model's actual parameters, obtained with
`jax.eval_shape` (shapes only, nothing is computed). Multiply-adds count the convolutions and the
classifier, as the papers do. Imports no torch.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp

import mobilenet_arch
from flax_mobilenet.models import MobileNet
from toolkit.cli import ArgumentParser, architecture_or_fail, fail


def flax_parameter_count(architecture: mobilenet_arch.Architecture, resolution: int) -> int:
    """Number of entries in the Flax model's `params` (BatchNorm statistics are not parameters)."""
    model = MobileNet(architecture)
    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def _cell(value) -> str:
    if isinstance(value, tuple):
        return " x ".join(map(str, value)).replace(" x dw", " dw")
    return str(value)


def format_table(rows: list[dict]) -> str:
    header = ("Type / Stride", "Filter Shape", "Input Size", "Params", "Mult-Adds")
    body = [
        (r["type"], _cell(r["filter"]), _cell(r["input"]), f"{r['params']:,}", f"{r['mult_adds']:,}") for r in rows
    ]
    total = ("Total", "", "", f"{sum(r['params'] for r in rows):,}", f"{sum(r['mult_adds'] for r in rows):,}")
    widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]

    def line(cells) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:3], widths)]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:])]
        return "  ".join(left + right)

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, body), rule, line(total)])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m flax_mobilenet.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=mobilenet_arch.ARCHS)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier alpha (default 1.0)")
    parser.add_argument("--resolution", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    architecture = architecture_or_fail(args.arch, args.width, args.num_classes)
    if args.resolution < 1:
        fail(f"--resolution must be positive, got {args.resolution}")

    rows = mobilenet_arch.layer_table(architecture, args.resolution)
    params, mult_adds = sum(r["params"] for r in rows), sum(r["mult_adds"] for r in rows)
    print(f"MobileNet{args.arch.upper()} width {args.width}, input {args.resolution}x{args.resolution}x3, {args.num_classes} classes\n")
    print(format_table(rows))
    flax_params = flax_parameter_count(architecture, args.resolution)
    print(
        f"\nparameters: {params:,} ({params / 1e6:.2f}M) from the table, {flax_params:,} in the Flax model"
        f" ({'equal' if flax_params == params else 'DIFFERENT'})\n"
        f"multiply-adds: {mult_adds:,} ({mult_adds / 1e6:.1f}M)"
    )
    return 0 if flax_params == params else 1


if __name__ == "__main__":
    sys.exit(main())
