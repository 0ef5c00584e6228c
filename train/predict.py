"""`python -m train.predict --weights FILE IMAGE...`: the top-5 classes of each image, with their
names and probabilities.

The weights are anything `parity.load` reads (a .msgpack written by train.main, a .pth or
.safetensors of torchvision or timm, a Hugging Face folder, a .keras file). Each image is prepared
as the checkpoint says (`Checkpoint.preprocess`): its shorter side resized and the centre cropped
(torchvision's evaluation transforms), or the whole image resized (Keras's), then normalised. The
model runs in JAX, or with `--framework torch` in PyTorch: the same numbers.

Class names: the checkpoint's (`parity.load`: a Hugging Face config's id2label, a .msgpack's
description, torchvision's ImageNet weights; for a .pth written by train.main, its run's record),
or `--labels FILE` (one per line), else the class numbers. The flags and files are checked before
jax or torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from toolkit import allocator
from toolkit.cli import ArgumentParser, fail
from train import config as config_lib


def build_parser() -> argparse.ArgumentParser:
    description = " ".join(__doc__.split("\n\n")[1].split())  # the docstring's second paragraph
    p = ArgumentParser(prog="python -m train.predict", description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=argparse.SUPPRESS, required=True, help="the checkpoint: a file or a Hugging Face folder")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads)")
    config_lib.add_flag(p, "framework", help="which implementation runs the model")
    p.add_argument("--top", type=config_lib.positive_int, default=5, help="classes shown per image")
    p.add_argument("--labels", metavar="FILE", help="the class names, one per line in the outputs' order, in place of the checkpoint's")
    return p


def flag_problem(args: argparse.Namespace) -> str | None:
    if not Path(args.weights).exists():
        return f"--weights {args.weights}: no such file or folder"
    if args.labels is not None and not Path(args.labels).is_file():
        return f"--labels {args.labels}: no such file"
    missing = [image for image in args.images if not Path(image).is_file()]
    if missing:
        return f"{missing[0]}: no such image file"
    return None


def probabilities_jax(checkpoint, images: np.ndarray) -> np.ndarray:
    import jax

    logits = jax.jit(lambda x: checkpoint.model.apply(checkpoint.variables, x, train=False))(images)
    return np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))


def probabilities_torch(checkpoint, images: np.ndarray) -> np.ndarray:
    import torch

    import parity

    model = parity.load_torch(checkpoint)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    return torch.softmax(logits.float(), dim=-1).numpy()


def class_names(checkpoint) -> list[str]:
    """The checkpoint's class names, or the class numbers where it has none."""
    return list(checkpoint.labels or (f"class {i}" for i in range(checkpoint.architecture.num_classes)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.keep_step_buffers()
    problem = flag_problem(args)
    if problem:
        fail(problem)
    from train.checkpoint import load_pretrained

    try:
        checkpoint = load_pretrained(args.weights, labels=args.labels)
        classes = checkpoint.architecture.num_classes
        if classes == 0:
            raise ValueError(f"{args.weights} is a feature extractor (no classifier): there are no classes to predict")
        images = checkpoint.preprocess(args.images)
    except ValueError as e:  # parity's errors, parity.preprocess.ImageError
        fail(str(e))
    run = probabilities_jax if args.framework == "jax" else probabilities_torch
    probabilities = run(checkpoint, images)
    names = class_names(checkpoint)
    for path, p in zip(args.images, probabilities):
        print(path)
        for index in np.argsort(-p, kind="stable")[: args.top]:
            print(f"  {p[index]:.4f}  {index:>4}  {names[index]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
