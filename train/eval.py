"""`python -m train.eval --weights FILE [--framework jax|torch] [--dataset NAME|DIR]`

Evaluates a checkpoint (anything `parity.load` reads: a .msgpack or .pth of train.main's, a
torchvision/timm .pth or .safetensors, a Hugging Face folder, a .keras file) on the dataset's
evaluation split in either framework, and prints `accuracy=<value>` as its last line. The
architecture, width and classes come from the weights; on a folder of images, the evaluation
resize, crop and normalisation are the checkpoint's (`parity.preprocess`, as train.predict's).
The flags are checked before jax or torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit import allocator
from toolkit.cli import ArgumentParser, fail
from train import config as config_lib
from train import datasets, metrics


def evaluate_jax(checkpoint, batches) -> float:
    import jax

    from train import step

    # The variables as an argument, not a closure: closed over, they would be baked into the
    # compiled program as constants.
    @jax.jit
    def sums(variables, batch):
        return step.eval_sums(checkpoint.model.apply(variables, batch["image"], train=False), batch)

    return metrics.summarise(jax.device_get([sums(checkpoint.variables, b) for b in batches]))["accuracy"]


def evaluate_torch(checkpoint, batches) -> float:
    import parity
    from train import torch_step

    model = parity.load_torch(checkpoint)
    totals = [torch_step.eval_step(model, b) for b in batches]
    return metrics.summarise([{name: value.item() for name, value in t.items()} for t in totals])["accuracy"]


def class_order_problem(labels, class_names, weights: str, dataset: str) -> str | None:
    """Why the checkpoint's class names (its `labels`) contradict the dataset's: the same names in
    another order, so every accuracy would count the wrong class. Names of another vocabulary (a
    TFDS dataset's synsets against torchvision's words) say nothing either way."""
    if not labels or not class_names or tuple(labels) == tuple(class_names) or sorted(labels) != sorted(class_names):
        return None
    first = next(i for i, (a, b) in enumerate(zip(labels, class_names)) if a != b)
    return (
        f"{weights} names output {first} {labels[first]!r} and {dataset} names class {first} {class_names[first]!r}: the same classes in another order, "
        "so the accuracy would count the wrong ones: evaluate on a dataset whose classes are in the checkpoint's order"
    )


def build_parser() -> argparse.ArgumentParser:
    """train.main's flags where they mean the same (the model, the data), and --weights."""
    description = " ".join(__doc__.split("\n\n")[1].split())  # the docstring's second paragraph
    p = ArgumentParser(prog="python -m train.eval", description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # SUPPRESS: a required flag has no default to show.
    p.add_argument("--weights", default=argparse.SUPPRESS, required=True, help="the checkpoint: a file or a Hugging Face folder")
    config_lib.add_flag(p, "arch", default=None, help="only checked: the architecture comes from the weights")
    config_lib.add_flag(p, "width", default=None, help="only checked: the width comes from the weights")
    config_lib.add_flag(p, "framework", help="which implementation runs the model")
    for name in ("dataset", "data_dir", "resolution"):
        config_lib.add_flag(p, name)
    config_lib.add_flag(p, "batch_size", default=100, help="examples per forward pass")
    return p


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags on their own, found without jax or torch."""
    if args.arch and args.resolution is not None and (problem := config_lib.resolution_problem(args.arch, args.resolution)):
        return problem
    if not Path(args.weights).exists():
        return f"--weights {args.weights}: no such file or folder"
    return datasets.dataset_problem(args.dataset, args.data_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.keep_step_buffers()
    problem = flag_problem(args)
    if problem:
        fail(problem)
    from parity import ConversionError
    from train import data
    from train.checkpoint import load_pretrained

    overrides = {"arch": args.arch} if args.arch else {}
    if args.width is not None:
        overrides["width_mult"] = args.width
    try:
        checkpoint = load_pretrained(args.weights, **overrides)
        if checkpoint.architecture.num_classes == 0:
            raise ValueError(f"{args.weights} is a feature extractor (no classifier): there is no accuracy to measure")
        info = data.dataset_info(args.dataset, args.data_dir)
        if info.num_classes != checkpoint.architecture.num_classes:
            raise ValueError(
                f"{args.weights} has {checkpoint.architecture.num_classes} classes and {args.dataset} has {info.num_classes}: "
                "expected a checkpoint trained on this dataset's classes (fine-tune it with train.main --init-from)"
            )
        problem = class_order_problem(checkpoint.labels, info.class_names, args.weights, args.dataset)
        if problem:
            raise ValueError(problem)
        folder = datasets.is_folder(args.dataset)
        resolution = args.resolution or (checkpoint.preprocessing.crop_size if folder else info.default_resolution)
        problem = config_lib.resolution_problem(checkpoint.architecture.arch, resolution)
        if problem:
            raise ValueError(problem)
        recipe = data.recipe(None, resolution, checkpoint.preprocessing) if folder else None
        batches = data.eval_batches(args.dataset, resolution=resolution, global_batch_size=args.batch_size, data_dir=args.data_dir, recipe=recipe)
        accuracy = (evaluate_jax if args.framework == "jax" else evaluate_torch)(checkpoint, batches)
    except (ValueError, ConversionError) as e:  # DataError, WeightsFileError, ConversionError
        fail(str(e))
    print(f"accuracy={accuracy:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
