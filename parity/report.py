"""Where do the PyTorch and Flax models start to disagree? Block-by-block activation differences.

    python -m parity.report --arch v2 --width 1.0 [--weights FILE] [--dtype bfloat16]

Runs the PyTorch model (torch_ref or torchvision's mobilenet_v2, float32) and the Flax model (float32
or bfloat16 computation) on the same random batch, with the weights of FILE or random weights with
randomised BatchNorm statistics, and prints for every block (features_0 ... features_N, the pooled
features, the logits) the output shape, the largest absolute difference, and the largest relative
difference

    max |flax - torch| / max |torch|        (over the whole block output)

and marks the first block whose relative difference exceeds the tolerance. Exit 0 when every block
is within it, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import torch

import flax_mobilenet
import mobilenet_arch
from mobilenet_arch import MIN_RESOLUTION
from parity.checkpoint import load, load_torch
from parity.io import WeightsFileError
from parity.layouts import ConversionError, from_flax
from parity.layouts import torchvision as torchvision_layout
from parity.models import DTYPES, REFERENCES, to_nchw, torch_model
from parity.random_weights import random_batch, random_torch_model
from toolkit.cli import ArgumentParser, architecture_or_fail, fail

# float32 rounding through ~50 layers stays near 1e-6 relative (measured); a difference 100x
# larger is an implementation difference. bfloat16 (8 bits of mantissa) is ~1e-2 and fails it.
DEFAULT_TOLERANCE = 1e-4
RELATIVE = "max|flax - torch| / max|torch| over the block's output"


def torch_activations(model: torch.nn.Module, x_nhwc: np.ndarray, head: mobilenet_arch.Head) -> dict[str, np.ndarray]:
    """Output of every `features[i]`, the pooled features and the logits, NHWC numpy."""
    outputs: dict[str, np.ndarray] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            value = output.detach().numpy()
            outputs[name] = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value

        return hook

    def keep_input(module, inputs):
        outputs["pool"] = inputs[0].detach().numpy()

    # The pool is functional in both torch_ref and torchvision: the head's first linear layer sees
    # its output (through a Dropout, the identity in eval mode), as Flax's first Dense does.
    handles = [block.register_forward_hook(keep(f"features_{i}")) for i, block in enumerate(model.features)]
    if head.layers:
        handles.append(model.get_submodule(head.torch_names[0]).register_forward_pre_hook(keep_input))
    try:
        with torch.no_grad():
            outputs["logits"] = model.eval()(to_nchw(x_nhwc)).numpy()
    finally:
        for handle in handles:
            handle.remove()
    if not head.layers:  # a feature extractor: its output is the pooled features
        outputs["pool"] = outputs["logits"]
    return {**{k: v for k, v in outputs.items() if k != "logits"}, "logits": outputs["logits"]}


def model_head(model: torch.nn.Module) -> mobilenet_arch.Head:
    """torchvision's head, as the hooks find it: one layer at `classifier.1`, or none."""
    linear = model.classifier[1] if isinstance(model.classifier[1], torch.nn.Linear) else None
    return mobilenet_arch.Head((mobilenet_arch.Dense(linear.out_features),) if linear is not None else ())


def flax_activations(model: nn.Module, variables: Any, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """The same activations from the Flax model, as float32 numpy."""

    def run(variables, x):
        is_dropout = lambda module, method: isinstance(module, nn.Dropout)  # noqa: E731
        return model.apply(variables, x, train=False, mutable=["intermediates"], capture_intermediates=is_dropout)

    logits, state = jax.jit(run)(variables, x_nhwc)
    sown = state["intermediates"]
    outputs = {block.name: sown[block.name]["output"][0] for block in model.architecture.blocks}
    # The first Dropout (before the head's first layer) passes the pooled features on; a feature
    # extractor has none and returns them.
    outputs["pool"] = sown["Dropout_0"]["__call__"][0] if "Dropout_0" in sown else logits
    outputs["logits"] = logits
    return {name: np.asarray(value, np.float32) for name, value in outputs.items()}


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, ref in reference.items():
        if other[name].shape != ref.shape:
            raise ValueError(f"{name}: Flax output {other[name].shape}, PyTorch output {ref.shape}")
        diff = np.abs(other[name].astype(np.float64) - ref.astype(np.float64))
        scale = float(np.max(np.abs(ref)))
        rows.append(
            {
                "block": name,
                "shape": "x".join(map(str, ref.shape)),
                "max_abs": float(diff.max()),
                "max_rel": float(diff.max()) / scale if scale > 0 else float(diff.max()),
            }
        )
    return rows


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m parity.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=mobilenet_arch.ARCHS)
    parser.add_argument("--width", type=float, help="width multiplier (default 1.0; with --weights, a check of theirs)")
    parser.add_argument("--weights", help="weights to compare: any source parity.load reads (a file or a Hugging Face directory); default random")
    parser.add_argument("--resolution", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--reference", choices=REFERENCES, default="torch_ref", help="the PyTorch model (default torch_ref)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="Flax computation dtype")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative difference accepted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    architecture_or_fail(args.arch, args.width or 1.0)
    if args.resolution < MIN_RESOLUTION or args.batch < 1:
        fail(f"--resolution must be at least {MIN_RESOLUTION} (the networks' total stride) and --batch positive, got {args.resolution} and {args.batch}")
    if args.reference == "torchvision" and args.arch != "v2":
        fail("torchvision has no MobileNetV1: use --reference torch_ref")
    try:
        if args.weights:
            checkpoint = load(args.weights, arch=args.arch, **({"width_mult": args.width} if args.width else {}))
            if args.reference == "torchvision":
                arch = checkpoint.architecture
                if arch.head.hidden or any(layer.activation for layer in arch.head.layers):
                    raise ConversionError(f"torchvision's mobilenet_v2 has one linear classifier, these weights {arch.head.describe()}: use --reference torch_ref")
                # torchvision's own name for the one layer, whatever the source called it.
                arch = mobilenet_arch.with_head(arch, mobilenet_arch.Head(tuple(mobilenet_arch.Dense(l.units, l.dropout) for l in arch.head.layers)))
                model = torch_model(args.arch, arch.width_mult, arch.num_classes, "torchvision")
                if not arch.num_classes:  # a feature extractor, as torchvision users make one
                    model.classifier[1] = torch.nn.Identity()
                state = from_flax(checkpoint.variables, torchvision_layout.rules(arch))
                missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
                assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
            else:
                model = load_torch(checkpoint)
            source = f"weights {args.weights}"
        else:
            model = random_torch_model(args.arch, args.width or 1.0, seed=args.seed, reference=args.reference)
            checkpoint = load(model, arch=args.arch, **({"width_mult": args.width} if args.width else {}))
            source = f"random weights, randomised BatchNorm (seed {args.seed})"
        architecture, variables = checkpoint.architecture, checkpoint.variables
    except (WeightsFileError, ConversionError, OSError) as e:
        fail(f"{args.weights}: {e}" if args.weights and args.weights not in str(e) else str(e))
    x = random_batch(args.batch, args.resolution, args.seed)
    rows = compare(
        torch_activations(model, x, architecture.head if args.reference == "torch_ref" else model_head(model)),
        flax_activations(flax_mobilenet.MobileNet(architecture, DTYPES[args.dtype]), variables, x),
    )

    print(
        f"MobileNet{args.arch.upper()} width {architecture.width_mult:g}, {source}, input {'x'.join(map(str, x.shape))} (NHWC)\n"
        f"PyTorch ({args.reference}, float32) vs Flax ({args.dtype})\n"
        f"relative difference = {RELATIVE}; tolerance {args.tolerance:g}\n"
    )
    print(f"{'block':<12} {'output shape':<18} {'max abs diff':>12} {'max rel diff':>12}")
    first = next((row for row in rows if not row["max_rel"] <= args.tolerance), None)
    for row in rows:
        mark = "  <- first divergence" if row is first else ""
        print(f"{row['block']:<12} {row['shape']:<18} {row['max_abs']:>12.3e} {row['max_rel']:>12.3e}{mark}")
    print()
    if first is None:
        print(f"all {len(rows)} blocks within tolerance {args.tolerance:g}")
        return 0
    print(f"first divergence at {first['block']}: relative difference {first['max_rel']:.3g} > {args.tolerance:g}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
