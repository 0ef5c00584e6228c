"""The set-up checks: what the flags, --init-from's checkpoint, the dataset and the devices make of
a run, found before any work starts.

    config, init, notes = with_checkpoint(config)   --init-from's architecture and weights, parity's notes
    run_plan = make(config, init, notes)           the run's size, model, data recipe and preprocessing
    print(describe_init(config, run_plan))         what --init-from read, kept, replaced and ignored

Each raises ValueError with a one-line message (train.main prints it and exits 2).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
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
    init_notes: tuple[str, ...] = ()  # what parity.load said of it (a prefix stripped, entries ignored)
    new_head: tuple[str, ...] = ()  # the head layers (Flax names) that start new rather than from --init-from's
    recipe: Any = None  # the data's train.augment.Recipe
    preprocessing: Any = None  # what the exported weights expect (parity.Preprocessing)
    class_names: tuple[str, ...] = ()


def with_checkpoint(config: config_lib.Config) -> tuple[config_lib.Config, Any, tuple[str, ...]]:
    """`config` with --init-from's arch and width, its parity.Checkpoint (None without
    --init-from) and the notes parity.load gave while reading it (its warnings: a key prefix
    stripped, a training checkpoint's other entries ignored); ValueError when the file cannot be
    read or --arch/--width contradict it."""
    if not config.init_from:
        return config, None, ()
    from train import checkpoint

    given = {name: value for name, value in (("arch", config.arch), ("width", config.width)) if value is not None}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            init = checkpoint.load_pretrained(config.init_from, **given)
    except ValueError as e:  # WeightsFileError, ConversionError, LayoutError
        raise ValueError(f"--init-from {config.init_from}: {e}") from None
    notes = []
    # parity's notes are plain UserWarnings (their stacklevel points at the caller, so the category
    # is what tells them apart): they go into describe_init's line; deprecations and the like stay warnings.
    for w in caught:
        if w.category is UserWarning:
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    arch = init.architecture
    return dataclasses.replace(config, arch=arch.arch, width=arch.width_mult), init, tuple(notes)


def make(config: config_lib.Config, init: Any = None, init_notes: tuple[str, ...] = ()) -> Plan:
    """Check the flags (and --init-from's checkpoint `init`, with what parity said of it) against
    the dataset and the devices; raise ValueError with a one-line message when they do not fit."""
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
    architecture = train_architecture(config, info.num_classes, init)
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
        init_notes=tuple(init_notes),
        new_head=new_head_layers(config, architecture, init),
        recipe=recipe,
        preprocessing=_preprocessing(config, info, resolution, recipe),
        class_names=tuple(info.class_names),
    )
    problem = record.workdir_problem(config, run_plan)
    if problem:
        raise ValueError(problem)
    return run_plan


def train_architecture(config, num_classes: int, init=None) -> mobilenet_arch.Architecture:
    """The model to train: --arch and --width's with --head's hidden layers, or --init-from's
    (`init`, a parity.Checkpoint) with its head for `num_classes` classes (its hidden layers
    kept, a new output layer where the count differs), or with --head's in place of its head.
    --dropout and --head-dropout set the dropout before the first and before each later layer."""
    hidden = {"hidden": config.head, "hidden_activation": config.head_activation} if config.head else {}
    if init is None:
        dropout = {} if config.dropout is None else {"dropout": config.dropout}
        arch = mobilenet_arch.architecture(config.arch, config.width, num_classes, **dropout, **hidden)
    elif config.head is not None:  # a new head: the checkpoint's dropout unless --dropout says
        dropout = init.architecture.dropout if config.dropout is None else config.dropout
        head = mobilenet_arch.make_head(num_classes, dropout, output=init.architecture.head.output, **hidden)
        arch = mobilenet_arch.with_head(init.architecture, head)
    else:
        arch = mobilenet_arch.with_classes(init.architecture, num_classes)
        if config.head_dropout is not None and len(arch.head.layers) < 2:
            raise ValueError(
                f"--head-dropout: the head of {config.init_from} ({init.architecture.head.describe()}) has no layer after "
                "the first to drop before: give --head (e.g. --head 256) for a new head with hidden layers"
            )
    return _with_head_dropout(arch, config.dropout if init is not None else None, config.head_dropout)


def _with_head_dropout(arch: mobilenet_arch.Architecture, first: float | None, later: float | None) -> mobilenet_arch.Architecture:
    """`arch` with dropout `first` before its head's first layer and `later` before each other
    (None: as it is)."""
    layers = [
        layer if value is None else dataclasses.replace(layer, dropout=value)
        for layer, value in zip(arch.head.layers, [first] + [later] * (len(arch.head.layers) - 1))
    ]
    return mobilenet_arch.with_head(arch, dataclasses.replace(arch.head, layers=tuple(layers)))


def new_head_layers(config, architecture: mobilenet_arch.Architecture, init) -> tuple[str, ...]:
    """The Flax names of the head layers that do not start from --init-from's weights: all of them
    when --head gives a new head, the output layer when the class count differs, else none."""
    names = architecture.head.flax_names
    if init is None:
        return ()
    if config.head is not None:
        return names
    return names[-1:] if init.architecture.num_classes != architecture.num_classes else ()


def describe_init(config, run_plan: Plan) -> str:
    """One line: what --init-from read (layout, architecture, head), kept, replaced and what parity
    said it ignored; the head that trains where it differs from the checkpoint's."""
    import jax

    init, arch = run_plan.init, run_plan.architecture
    before = init.architecture
    head_names = set(before.head.flax_names)
    backbone = sum(
        len(jax.tree.leaves(tree)) for collection in init.variables.values() for name, tree in collection.items() if name not in head_names
    )
    parts = [
        f"init-from {Path(config.init_from).name}: {init.layout} MobileNet{before.arch.upper()} width {before.width_mult:g}, "
        f"head {before.head.describe()}"
    ]
    kept = f"kept the backbone ({backbone} tensors)"
    new = run_plan.new_head
    if not new:
        parts.append(f"{kept} and the head")
    elif config.head is not None:
        parts += [kept, f"replaced the head by --head's, all layers new: {arch.head.describe()}"]
    else:
        hidden = mobilenet_arch.Head(before.head.hidden)
        parts.append(f"{kept} and the hidden layers ({hidden.describe()})" if hidden.layers else kept)
        parts.append(
            f"replaced the {before.num_classes}-class output layer by a new {arch.num_classes}-class one"
            if before.num_classes
            else f"added a new {arch.num_classes}-class output layer"
        )
    # --dropout or --head-dropout changed the kept head's dropout.
    if config.head is None and arch.head.describe() != mobilenet_arch.with_classes(before, arch.num_classes).head.describe():
        parts.append(f"trains: {arch.head.describe()}")
    parts += list(run_plan.init_notes)
    return "; ".join(parts)


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
