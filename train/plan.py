"""The set-up checks: what the flags, --init-from's checkpoint, the dataset and the devices make of
a run, found before any work starts.

    config, init = with_checkpoint(config)     --init-from's architecture and weights
    run_plan = make(config, init)              the run's size, model, data recipe and preprocessing

Each raises ValueError with a one-line message (train.main prints it and exits 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mobilenet_arch
from train import config as config_lib
from train import datasets, record


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the checks found: everything the loop needs to know about the run's size."""

    num_classes: int
    resolution: int
    steps_per_epoch: int
    total_steps: int  # the schedule's length: --epochs
    stop_step: int  # where this run stops: --max-steps if smaller
    checkpoint_every: int
    architecture: mobilenet_arch.Architecture | None = None  # the model trained
    frozen_blocks: int = 0  # blocks of `features`, from the stem on, that do not train
    init: Any = None  # --init-from's parity.Checkpoint
    recipe: Any = None  # the data's train.augment.Recipe
    preprocessing: Any = None  # what the exported weights expect (parity.Preprocessing)
    class_names: tuple[str, ...] = ()


def with_checkpoint(config: config_lib.Config) -> tuple[config_lib.Config, Any]:
    """`config` with --init-from's arch and width, and its parity.Checkpoint (None without
    --init-from); ValueError when the file cannot be read or --arch/--width contradict it."""
    if not config.init_from:
        return config, None
    from train import checkpoint

    given = {name: value for name, value in (("arch", config.arch), ("width", config.width)) if value is not None}
    try:
        init = checkpoint.load_pretrained(config.init_from, **given)
    except ValueError as e:  # WeightsFileError, ConversionError, LayoutError
        raise ValueError(f"--init-from {config.init_from}: {e}") from None
    arch = init.architecture
    return dataclasses.replace(config, arch=arch.arch, width=arch.width_mult), init


def make(config: config_lib.Config, init: Any = None) -> Plan:
    """Check the flags (and --init-from's checkpoint `init`) against the dataset and the devices;
    raise ValueError with a one-line message when they do not fit."""
    from train import data, distributed

    info = data.dataset_info(config.dataset, config.data_dir)
    # --init-from's weights were trained at their crop size.
    resolution = config.resolution or (init.preprocessing.crop_size if init is not None else info.default_resolution)
    problem = config_lib.resolution_problem(config.arch, resolution)
    if problem:
        raise ValueError(problem)
    if config.framework == "jax":
        problem = distributed.check_batch_size(config.batch_size)
        if problem:
            raise ValueError(problem)
    architecture = _architecture(config, info.num_classes, init)
    blocks = len(architecture.blocks)
    if config.trainable_blocks is not None and config.trainable_blocks > blocks:
        raise ValueError(
            f"--trainable-blocks {config.trainable_blocks}: MobileNet{architecture.arch.upper()} has {blocks} blocks in "
            f"features (stem to head): expected 0..{blocks}"
        )
    recipe = data.recipe(config, resolution, init.preprocessing if init is not None else None)
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size, config.data_dir)
    total = config.epochs * steps_per_epoch
    stop = min(total, config.max_steps or total)
    run_plan = Plan(
        info.num_classes,
        resolution,
        steps_per_epoch,
        total,
        stop,
        config.checkpoint_every or steps_per_epoch,
        architecture=architecture,
        frozen_blocks=config_lib.frozen_block_count(config, blocks),
        init=init,
        recipe=recipe,
        preprocessing=_preprocessing(config, info, resolution, recipe),
        class_names=tuple(info.class_names),
    )
    problem = record.workdir_problem(config, run_plan)
    if problem:
        raise ValueError(problem)
    return run_plan


def _architecture(config, num_classes: int, init) -> mobilenet_arch.Architecture:
    """The model to train: --arch and --width's, or --init-from's with `num_classes` classes."""
    dropout = {} if config.dropout is None else {"dropout": config.dropout}
    if init is None:
        return mobilenet_arch.architecture(config.arch, config.width, num_classes, **dropout)
    arch = mobilenet_arch.with_classes(init.architecture, num_classes)
    return arch if config.dropout is None else mobilenet_arch.with_dropout(arch, config.dropout)


def _preprocessing(config, info, resolution: int, recipe):
    """What the exported weights expect of an image: the evaluation's resize, crop and
    normalisation. Digits and small TFDS images are resized whole to the input size; large TFDS
    images are resized to resolution / 0.875 and centre-cropped (train/data.py)."""
    from parity import Preprocessing
    from train import augment, data

    mode, offset = "shorter", "round"
    if datasets.is_folder(config.dataset):
        resize, crop, mode, offset = recipe.eval_resize, recipe.eval_crop, recipe.eval_resize_mode, recipe.eval_crop_offset
    elif info.default_resolution > data.SMALL_IMAGE_MAX_SIDE:
        resize, crop = round(resolution / augment.EVAL_CROP_FRACTION), resolution
    else:
        resize, crop = resolution, resolution
    return Preprocessing(tuple(recipe.mean), tuple(recipe.std), resize, crop, recipe.interpolation, mode, offset)
