"""Input pipelines: scikit-learn's digits (the default), any TFDS image classification dataset,
and a folder of images in torchvision's ImageFolder layout (`train.folder`).

All are grain `MapDataset` pipelines over random-access sources, so an epoch is a pure
function of (seed, epoch): the same batches in JAX and PyTorch, on one host or many, resumed
or not, with any number of worker processes.

Interface (used by `train/` for both frameworks; the torch path transposes to NCHW itself):

    DataError(ValueError)                 one-line message for the user
    DatasetInfo(name, num_classes, train_size, eval_size, default_resolution, class_names)
        class_names: the label of class i is class_names[i] (a folder's subfolder names, sorted;
        a TFDS ClassLabel's names; "0".."9" for digits): what run.json and checkpoints record.
    dataset_info(name, data_dir=None) -> DatasetInfo
        For a folder this checks its layout and opens every image (see train/folder.py), once
        per process: call it before any work, its DataError is the user's one-line error.
    recipe(config, resolution, preprocessing=None) -> augment.Recipe
        The transforms of a run: each flag that `config` gives (a train.config.Config; a field
        that is None or absent is not given), else the checkpoint's `preprocessing` (anything
        with mean, std, resize_size, crop_size, interpolation: parity's Preprocessing), else
        torchvision's. Pass it to train_batches and eval_batches; a folder uses all of it,
        digits and TFDS only its mean and std.
    steps_per_epoch(name, global_batch_size, data_dir=None) -> int   (train_size // global batch)
    train_batches(name, *, resolution, global_batch_size, seed, epoch, start_batch=0,
                  process_index=0, process_count=1, data_dir=None, recipe=None,
                  workers=None, threads=None) -> Iterator[dict]
        One epoch of {"image": float32 [local, H, W, 3] normalised, "label": int32 [local]},
        local = global_batch_size // process_count, the last partial global batch dropped.
        Batch b holds positions [b * global, (b + 1) * global) of the epoch's shuffle and
        process p gets the contiguous block [p * local, (p + 1) * local) of it, so the
        processes' local batches concatenated in process order are the global batch
        (what `jax.make_array_from_process_local_data` assembles). The shuffle and every
        random crop/flip depend only on (seed, epoch, position in the epoch): `start_batch=k`
        yields exactly batches k.. of the uninterrupted epoch. `workers` (a folder only):
        grain worker processes decoding (default 0: `threads` threads of this process,
        default one per core).
    eval_batches(name, *, resolution, global_batch_size, process_index=0, process_count=1,
                 data_dir=None, recipe=None, workers=None, threads=None) -> Iterator[dict]
        The whole eval split in order, as above plus "mask": float32 [local] (1 real,
        0 padding); the split is padded to a whole number of global batches so every
        example counts exactly once and every batch has the same shape (a folder's:
        recipe.eval_crop a side).
    eval_examples(name, split, *, resolution, data_dir=None, recipe=None) -> grain.MapDataset
        Either split ("train" or "eval") as evaluation prepares it, {"image": uint8, "label"},
        unnormalised and unbatched (a quantized export's calibration and check read it).

Datasets:
- "digits": `sklearn.datasets.load_digits` (1,797 8x8 grey images, 0..16), split 80/20
  stratified by `train_test_split(random_state=0)`: 1,437 train, 360 test. Scaled to 0..255,
  resized bilinearly to the resolution once per resolution, replicated to 3 channels. Training
  augmentation: a random translation of up to resolution // 8 pixels (zero pad + crop); no flip,
  digits are not mirror-symmetric.
- Any other name is a TFDS dataset with "image" and "label" features, read with
  `tfds.data_source` from ArrayRecord files (no TensorFlow needed), train split "train", eval
  split "test" or else "validation". Images of at most SMALL_IMAGE_MAX_SIDE pixels (cifar10,
  mnist): pad side // 8 + random crop + flip, then resize to the resolution; evaluation only
  resizes. Larger images (imagenette, imagenet2012): inception random-resized crop + flip;
  evaluation resizes the shorter side to resolution / 0.875 and crops the centre.
- A folder (`--dataset DIR`, see `train.datasets.is_folder`): `augment.Recipe`, torchvision's
  transforms (RandomResizedCrop, flip, rotation, colour jitter; evaluation Resize and
  CenterCrop) on PIL images decoded in threads of the training process (`train.folder`), or in
  grain's worker processes.
- All: mean/std normalisation (`train.augment.normalize`; ImageNet's unless the recipe says).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator

import grain
import numpy as np

from train import augment, folder
from train.datasets import is_folder
from train.folder import DataError

DIGITS = "digits"
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16
DIGITS_RESOLUTION = 32
TFDS_TRAIN_SPLIT = "train"
TFDS_EVAL_SPLITS = ("test", "validation")
SMALL_IMAGE_MAX_SIDE = 64
LARGE_IMAGE_RESOLUTION = 224
# Translation (digits) and padding (small TFDS images) as a fraction of the side: 4 px at 32.
PAD_DIVISOR = 8
# Decoded batches each worker process keeps ready.
WORKER_BUFFER = 2

__all__ = ["DataError", "DatasetInfo", "dataset_info", "recipe", "steps_per_epoch", "train_batches", "eval_batches", "eval_examples"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    train_size: int
    eval_size: int
    default_resolution: int
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Split:
    """One split, ready for the pipeline: examples are {"image": uint8 [H, W, 3], "label": int}."""

    examples: grain.MapDataset
    num_classes: int
    train_transform: Callable[[dict, np.random.Generator], dict]
    eval_transform: Callable[[dict], dict]
    default_resolution: int
    class_names: tuple[str, ...]


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    recipe_ = _default_recipe(DIGITS_RESOLUTION)
    train = _open_split(name, "train", recipe_, data_dir)
    evaluation = _open_split(name, "eval", recipe_, data_dir)
    return DatasetInfo(
        name=name,
        num_classes=train.num_classes,
        train_size=len(train.examples),
        eval_size=len(evaluation.examples),
        default_resolution=train.default_resolution,
        class_names=train.class_names,
    )


def recipe(config, resolution: int, preprocessing=None) -> augment.Recipe:
    def given(name: str):
        return getattr(config, name, None)

    base = preprocessing
    mean = given("mean") or (base.mean if base else augment.IMAGENET_MEAN_RGB)
    std = given("std") or (base.std if base else augment.IMAGENET_STD_RGB)
    interpolation = given("interpolation") or (base.interpolation if base else "bilinear")
    if interpolation not in augment.INTERPOLATIONS:
        raise DataError(
            f"the checkpoint's interpolation {interpolation!r} is not one of {', '.join(augment.INTERPOLATIONS)}; "
            "pass --interpolation"
        )
    eval_crop = given("eval_crop") or resolution
    # The checkpoint's ratio of resize to crop (timm's crop_pct), else torchvision's 256 of 224.
    resize, crop = (base.resize_size, base.crop_size) if base else (augment.EVAL_RESIZE, augment.EVAL_CROP)
    eval_resize = given("eval_resize") or eval_crop * resize // crop
    if eval_resize < eval_crop:
        raise DataError(f"--eval-resize {eval_resize} is smaller than --eval-crop {eval_crop}: expected at least {eval_crop}")
    flags = {name: given(name) for name in augment.TRANSFORMS if given(name) is not None}
    return augment.Recipe(
        size=resolution,
        eval_resize=eval_resize,
        eval_crop=eval_crop,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        eval_resize_mode=base.resize if base else "shorter",
        eval_crop_offset=base.crop_offset if base else "round",
        **{name: tuple(value) if isinstance(value, list) else value for name, value in flags.items()},
    )


def _default_recipe(resolution: int) -> augment.Recipe:
    return recipe(None, resolution)


def steps_per_epoch(name: str, global_batch_size: int, data_dir: str | None = None) -> int:
    return _steps_per_epoch(dataset_info(name, data_dir).train_size, global_batch_size, name)


def train_batches(
    name: str,
    *,
    resolution: int,
    global_batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    recipe: augment.Recipe | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> Iterator[dict]:
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    recipe = _with_size(recipe, resolution)
    split = _open_split(name, "train", recipe, data_dir)
    size = len(split.examples)
    steps = _steps_per_epoch(size, global_batch_size, name)
    # grain folds the epoch into the shuffle seed after `repeat`, and `random_map` seeds each
    # element's generator from (pipeline seed, index), with index = epoch * size + position:
    # both are fixed before the epoch is cut into batches and shards.
    epoch_start = epoch * size
    ds = (
        split.examples.seed(_grain_seed(seed))
        .shuffle()
        .repeat()
        .random_map(split.train_transform)[epoch_start : epoch_start + steps * global_batch_size]
        .batch(local_batch, drop_remainder=True)
    )
    ds = ds[start_batch * process_count + process_index :: process_count]
    return _iterate(ds.map(functools.partial(_to_model_input, mean=recipe.mean, std=recipe.std)), name, workers, threads)


def eval_batches(
    name: str,
    *,
    resolution: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    recipe: augment.Recipe | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> Iterator[dict]:
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    recipe = _with_size(recipe, resolution)
    split = _open_split(name, "eval", recipe, data_dir)
    ds = split.examples.map(split.eval_transform).map(_real)
    padding = -len(ds) % global_batch_size
    if padding:
        side = recipe.eval_crop if is_folder(name) else resolution
        blank = {"image": np.zeros((side, side, 3), np.uint8), "label": 0, "mask": 0.0}
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([blank]).repeat(padding)])
    ds = ds.batch(local_batch)[process_index::process_count]
    return _iterate(ds.map(functools.partial(_to_model_input, mean=recipe.mean, std=recipe.std)), name, workers, threads)


def eval_examples(
    name: str, split: str, *, resolution: int, data_dir: str | None = None, recipe: augment.Recipe | None = None
) -> grain.MapDataset:
    """The examples of `split` ("train" or "eval"), {"image": uint8 [side, side, 3], "label"}, each
    prepared as evaluation prepares it (a folder's resize and centre crop, no augmentation) and
    not yet normalised: what a calibration of a quantized model, or its check, reads."""
    split_ = _open_split(name, split, _with_size(recipe, resolution), data_dir)
    return split_.examples.map(split_.eval_transform)


def _with_size(recipe_: augment.Recipe | None, resolution: int) -> augment.Recipe:
    if recipe_ is None:
        return _default_recipe(resolution)
    return dataclasses.replace(recipe_, size=resolution)


def _real(example: dict) -> dict:
    return {**example, "mask": 1.0}


def _to_model_input(batch: dict, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    out = {"image": augment.normalize(batch["image"], mean, std), "label": batch["label"].astype(np.int32)}
    if "mask" in batch:
        out["mask"] = batch["mask"].astype(np.float32)
    return out


def _iterate(ds: grain.MapDataset, name: str, workers: int | None, threads: int | None = None) -> Iterator[dict]:
    if not is_folder(name):
        return iter(ds.to_iter_dataset(_read_options(name)))
    if not workers:
        # Threads by default: PIL releases the GIL while it decodes and resizes, so they keep every
        # core busy, with no process to start and no batch to copy through shared memory. Worker
        # processes were idle a third of the time and ran at half the threads' rate per core
        # (bench/NOTES.md, "The folder pipeline").
        return iter(ds.to_iter_dataset(_read_options(name, threads)))
    # One thread a worker: the processes are the parallelism (as torch's DataLoader workers), and
    # each hands over whole normalised batches through shared memory.
    _absl_flags_parsed()
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=WORKER_BUFFER)
    multiprocessing = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=WORKER_BUFFER)
    return iter(ds.to_iter_dataset(options).mp_prefetch(multiprocessing, worker_init_fn=_worker_malloc))


def _worker_malloc(worker_index: int, worker_count: int) -> None:
    # A spawned worker starts with glibc's defaults, under which every decoded image is a fresh
    # mmap (a fifth of the worker's time in page faults); the training process's set-up keeps them.
    from toolkit import allocator

    allocator.keep_step_buffers()


def _absl_flags_parsed() -> None:
    # grain's worker start reads an absl flag, which raises unless absl parsed the command line
    # (google/grain#1355); ours is argparse's, so absl's flags keep their defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(name: str, threads: int | None = None) -> grain.ReadOptions:
    if name == DIGITS:
        # In memory and cheap: one thread overlaps batch assembly with the train step
        # without fighting it for the GIL.
        return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    threads = threads or min(16, os.cpu_count() or 1)
    # The buffer holds whole batches (float32): two per thread keep the threads busy while the
    # training step takes one (one per thread left a single thread waiting: 300 img/s against 400).
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _grain_seed(seed: int) -> int:
    # grain seeds are uint32; fold any Python int (negative, large) into that range.
    return int(np.random.SeedSequence(seed & (2**64 - 1)).generate_state(1, np.uint32)[0])


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process index {process_index} is not in 0..{process_count - 1}")
    if global_batch_size < process_count or global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} does not divide evenly over "
            f"{process_count} processes; expected a positive multiple of {process_count}"
        )
    return global_batch_size // process_count


def _steps_per_epoch(train_size: int, global_batch_size: int, name: str) -> int:
    if not 0 < global_batch_size <= train_size:
        raise DataError(
            f"global batch size {global_batch_size} is not in 1..{train_size}, "
            f"the number of training examples in {name!r}"
        )
    return train_size // global_batch_size


def _open_split(name: str, split: str, recipe_: augment.Recipe, data_dir: str | None) -> _Split:
    if name == DIGITS:
        return _digits_split(split, recipe_.size)
    if is_folder(name):
        return _folder_split(name, split, recipe_)
    with _absl_warnings_silenced():
        return _tfds_split(name, split, recipe_.size, data_dir)


# --- a folder of images ------------------------------------------------------------------------


def _folder_split(root: str, split: str, recipe_: augment.Recipe) -> _Split:
    images = folder.find(root)
    # Module-level functions and frozen values only: grain pickles the pipeline into its workers.
    return _Split(
        examples=grain.MapDataset.source(images.train if split == "train" else images.eval),
        num_classes=len(images.class_names),
        train_transform=functools.partial(folder.train_example, recipe=recipe_),
        eval_transform=functools.partial(folder.eval_example, recipe=recipe_),
        default_resolution=LARGE_IMAGE_RESOLUTION,
        class_names=images.class_names,
    )


# --- digits ----------------------------------------------------------------------------------


def _digits_split(split: str, resolution: int) -> _Split:
    images, labels = _digits_arrays(resolution)[split]
    pad = max(1, resolution // PAD_DIVISOR)
    examples = grain.MapDataset.range(len(labels)).map(
        lambda i: {"image": images[i], "label": labels[i]}
    )

    def translate(example: dict, rng: np.random.Generator) -> dict:
        return {**example, "image": augment.pad_and_random_crop(example["image"], rng, pad)}

    return _Split(
        examples=examples,
        num_classes=10,
        train_transform=translate,
        eval_transform=lambda example: example,
        default_resolution=DIGITS_RESOLUTION,
        class_names=tuple(str(digit) for digit in range(10)),
    )


@functools.lru_cache(maxsize=4)
def _digits_arrays(resolution: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"eval": (uint8 [n, resolution, resolution, 3], int32 [n])}, resized once."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.round(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    resized = np.stack([augment.resize(image, resolution, resolution) for image in grey])
    images = augment.to_rgb(resized[..., None])
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {
        "train": (images[train_idx], labels[train_idx]),
        "eval": (images[test_idx], labels[test_idx]),
    }


# --- TFDS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _absl_warnings_silenced():
    # TFDS logs a warning for each version folder it probes that holds no prepared data; a
    # missing dataset is reported once, in _tfds_split's DataError.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tfds_split(name: str, split: str, resolution: int, data_dir: str | None) -> _Split:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"unknown dataset {name!r}: expected {DIGITS!r} or the name of a TFDS image "
            "classification dataset, e.g. cifar10, imagenette, imagenet2012 "
            "(tfds.list_builders() lists them all)"
        ) from None
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()) or not hasattr(
        features["label"], "num_classes"
    ):
        raise DataError(
            f"dataset {name!r} is not an image classification dataset: expected 'image' and "
            f"'label' (ClassLabel) features, found {sorted(features.keys())}"
        )
    split_name = TFDS_TRAIN_SPLIT if split == "train" else _tfds_eval_split(builder)
    try:
        source = tfds.data_source(name, split=split_name, data_dir=data_dir, download=False)
    except (AssertionError, FileNotFoundError, NotImplementedError, ValueError) as error:
        raise DataError(_not_prepared_message(name, builder, split_name, data_dir)) from error

    height, width, _ = features["image"].shape
    small = height is not None and width is not None and max(height, width) <= SMALL_IMAGE_MAX_SIDE
    examples = grain.MapDataset.source(source).map(
        lambda example: {"image": augment.to_rgb(example["image"]), "label": example["label"]}
    )
    if small:
        train_transform = functools.partial(_small_train, resolution=resolution)
        eval_transform = functools.partial(_small_eval, resolution=resolution)
        default_resolution = max(height, width)
    else:
        train_transform = functools.partial(_large_train, resolution=resolution)
        eval_transform = functools.partial(_large_eval, resolution=resolution)
        default_resolution = LARGE_IMAGE_RESOLUTION
    return _Split(
        examples=examples,
        num_classes=features["label"].num_classes,
        train_transform=train_transform,
        eval_transform=eval_transform,
        default_resolution=default_resolution,
        class_names=tuple(features["label"].names),
    )


def _tfds_eval_split(builder) -> str:
    available = list(builder.info.splits.keys())
    if not available:
        # Unprepared (or mocked) datasets list no splits; "test" is then the usual name.
        return TFDS_EVAL_SPLITS[0]
    for split in TFDS_EVAL_SPLITS:
        if split in available:
            return split
    raise DataError(
        f"dataset {builder.name!r} has no evaluation split: expected one of "
        f"{list(TFDS_EVAL_SPLITS)}, found {sorted(available)}"
    )


def _not_prepared_message(name: str, builder, split: str, data_dir: str | None) -> str:
    import tensorflow_datasets as tfds

    root = data_dir or tfds.core.constants.get_default_data_dir()
    command = f"tfds build {name} --file_format=array_record --data_dir={root}"
    if builder.is_prepared():
        problem, command = f"has no ArrayRecord files for split {split!r}", command + " --overwrite"
    else:
        problem = "is not prepared"
    manual = (
        "; it also needs a manual download into --manual_dir, see its TFDS catalog page"
        if builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        else ""
    )
    return (
        f"dataset {name!r} {problem} in {root}; prepare it with `{command}` "
        f"(the build alone needs TensorFlow: pip install tensorflow{manual})"
    )


def _small_train(example: dict, rng: np.random.Generator, *, resolution: int) -> dict:
    image = example["image"]
    image = augment.pad_and_random_crop(image, rng, max(1, max(image.shape[:2]) // PAD_DIVISOR))
    image = augment.random_flip(image, rng)
    return {**example, "image": augment.resize(image, resolution, resolution)}


def _small_eval(example: dict, *, resolution: int) -> dict:
    return {**example, "image": augment.resize(example["image"], resolution, resolution)}


def _large_train(example: dict, rng: np.random.Generator, *, resolution: int) -> dict:
    image = augment.random_resized_crop(example["image"], rng, resolution)
    return {**example, "image": augment.random_flip(image, rng)}


def _large_eval(example: dict, *, resolution: int) -> dict:
    return {**example, "image": augment.center_crop(example["image"], resolution)}
