"""`python -m train.eval --arch v2 --width 1.0 --weights FILE [--framework jax|torch] [--dataset NAME]`

Evaluates a .msgpack, .pth/.pt or .safetensors file on the dataset's eval split in either
framework (the file is converted through `parity` when it comes from the other one) and prints
`accuracy=<value>` as its last line. The flags are checked before jax or torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import mobilenet_arch
from mobilenet_arch import allocator
from mobilenet_arch.cli import ArgumentParser, fail
from train import config as config_lib


def evaluate_jax(variables: dict, arch: str, width: float, batches) -> float:
    import jax
    import jax.numpy as jnp

    from flax_mobilenet import create_model

    num_classes = int(np.shape(variables["params"][mobilenet_arch.architecture(arch).flax_classifier]["bias"])[0])
    model = create_model(arch, width, num_classes)

    @jax.jit
    def correct(batch):
        logits = model.apply(variables, batch["image"], train=False)
        return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]), jnp.sum(batch["mask"])

    totals = np.array([jax.device_get(correct(b)) for b in batches], np.float64)
    return float(totals[:, 0].sum() / totals[:, 1].sum())


def evaluate_torch(state_dict: dict, arch: str, width: float, batches) -> float:
    import torch

    import torch_ref
    from parity.weights import num_classes_of
    from train.torch_step import to_torch

    model = torch_ref.create_model(arch, width, num_classes_of(state_dict, arch))
    model.load_state_dict(state_dict)
    model.eval()
    right = total = 0.0
    with torch.no_grad():
        for batch in batches:
            batch = to_torch(batch)
            hits = (model(batch["image"]).argmax(-1) == batch["label"]).float()
            right += float((hits * batch["mask"]).sum())
            total += float(batch["mask"].sum())
    return right / total


def build_parser() -> argparse.ArgumentParser:
    """train.main's flags where they mean the same (the model, the data), and --weights."""
    description = " ".join(__doc__.split("\n\n")[1].split())  # the docstring's second paragraph
    p = ArgumentParser(prog="python -m train.eval", description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # SUPPRESS: a required flag has no default to show.
    config_lib.add_flag(p, "arch", default=argparse.SUPPRESS, required=True)
    config_lib.add_flag(p, "width", help="width multiplier of the weights")
    p.add_argument("--weights", default=argparse.SUPPRESS, required=True, help=".msgpack (Flax), .pth/.pt or .safetensors (PyTorch)")
    config_lib.add_flag(p, "framework", help="which implementation runs the model")
    for name in ("dataset", "data_dir", "resolution"):
        config_lib.add_flag(p, name)
    config_lib.add_flag(p, "batch_size", default=100, help="examples per forward pass")
    return p


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags on their own, found without jax or torch."""
    if args.resolution is not None and (problem := config_lib.resolution_problem(args.arch, args.resolution)):
        return problem
    if not Path(args.weights).is_file():
        return f"--weights {args.weights}: no such file"
    return config_lib.dataset_problem(args.dataset, args.data_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.keep_step_buffers()
    problem = flag_problem(args)
    if problem:
        fail(problem)
    from parity import ConversionError
    from parity import io as weights_io
    from train import data

    try:
        info = data.dataset_info(args.dataset, args.data_dir)
        resolution = args.resolution or info.default_resolution
        problem = config_lib.resolution_problem(args.arch, resolution)
        if problem:
            raise ValueError(problem)
        batches = data.eval_batches(args.dataset, resolution=resolution, global_batch_size=args.batch_size, data_dir=args.data_dir)
        if args.framework == "jax":
            accuracy = evaluate_jax(weights_io.load_as_flax(args.weights, args.arch, args.width), args.arch, args.width, batches)
        else:
            accuracy = evaluate_torch(weights_io.load_as_torch(args.weights, args.arch, args.width), args.arch, args.width, batches)
    except (ValueError, ConversionError) as e:  # DataError, WeightsFileError, ConversionError
        fail(str(e))
    print(f"accuracy={accuracy:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
