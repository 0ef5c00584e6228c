"""What --dataset names, told without opening it: 'digits', a TFDS name, or a folder of images.
The data itself is train/data.py's; this is what the flag checks need, so that a mistyped name
fails before jax, grain or any data is loaded."""

from __future__ import annotations

import os


def is_folder(dataset: str) -> bool:
    """Whether --dataset names a folder of images rather than 'digits' or a TFDS name: a path that
    reads as one (absolute, ./, ../, ~, or ending in a separator; no TFDS name starts or ends so),
    or a directory holding train/ (a TFDS data directory's dataset folder holds versions)."""
    if dataset == "digits":
        return False
    if dataset.startswith(("/", "./", "../", "~", os.sep)) or dataset.endswith(("/", os.sep)):
        return True
    return os.path.isdir(os.path.join(dataset, "train"))


def dataset_problem(dataset: str, data_dir: str | None = None) -> str | None:
    """Why `dataset` names no dataset, or None. Asks TFDS's registry only, which imports neither
    jax nor torch; whether the data is prepared on disk is train/data.py's check."""
    if dataset == "digits" or is_folder(dataset):
        return None  # a folder's layout is train/data.py's check
    import tensorflow_datasets as tfds

    try:
        tfds.builder_cls(dataset.split(":")[0].split("/")[0])  # the registry: no disk, no logging
    except tfds.core.registered.DatasetNotFoundError:
        return (
            f"unknown --dataset {dataset!r}: expected 'digits', the name of a TFDS image classification "
            "dataset, e.g. cifar10, imagenette, imagenet2012 (tfds.list_builders() lists them all), "
            "or a folder of images (DIR/train/CLASS/*.jpg)"
            + (f"; the folder {dataset} has no train/ in it" if os.path.isdir(dataset) else "")
        )
    return None
