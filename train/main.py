"""`python -m train.main --arch v2 --width 1.0`: train, evaluate each epoch, checkpoint, export.

    train_and_evaluate(config)
        flag checks (arch, values, dataset name)  -> one-line error, exit 2, before jax or torch is imported
        set-up checks (--init-from's weights, dataset on disk, devices)
                                                  -> one-line error, exit 2, before any work
        WORKDIR/.lock                             held for the run's life (train/lock.py)
        jax:   state replicated over a mesh, batches sharded      (train/step.py, distributed.py)
        torch: torch_ref on the same batches, the same schedule   (train/torch_step.py)
        loop:  progress bar, metrics.jsonl + curves.png, checkpoints, NaN stop,
               WORKDIR/best.msgpack + best.pth after an evaluation better than any before
        WORKDIR/model.msgpack and WORKDIR/model.pth              (through parity)
        the final and best accuracy, and where everything went

Fine-tuning (--init-from): the checkpoint gives the architecture, its weights (a new classifier
when the class count differs) and the preprocessing the flags leave unsaid; --freeze and
--trainable-blocks freeze a prefix of `features` (BatchNorm in inference mode there, in both
frameworks), --backbone-lr-mult gives the rest of `features` its own learning rate.

A run started again in the same workdir resumes from its latest checkpoint; data order depends
only on (seed, epoch) and dropout keys on (seed, step), so the resumed run ends where an
uninterrupted one would. The PyTorch path seeds its dropout masks from (seed, step) too.

Flags are parsed and checked before jax or torch is imported (which takes seconds), so a mistyped
flag fails at once; the frameworks are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

import mobilenet_arch
from toolkit import allocator
from toolkit.cli import atomic_write_text, fail
from train import config as config_lib
from train import datasets, lock


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


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


def plan(config: config_lib.Config, init: Any = None) -> Plan:
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
    problem = workdir_problem(config, run_plan)
    if problem:
        raise ValueError(problem)
    return run_plan


def _architecture(config, num_classes: int, init) -> mobilenet_arch.Architecture:
    """The model to train: --arch and --width's, or --init-from's with `num_classes` classes."""
    dropout = {} if config.dropout is None else {"dropout": config.dropout}
    if init is None:
        return mobilenet_arch.architecture(config.arch, config.width, num_classes, **dropout)
    return dataclasses.replace(init.architecture, num_classes=num_classes, **dropout)


def _preprocessing(config, info, resolution: int, recipe):
    """What the exported weights expect of an image: the evaluation's resize, crop and
    normalisation. Digits and small TFDS images are resized whole to the input size; large TFDS
    images are resized to resolution / 0.875 and centre-cropped (train/data.py)."""
    from parity import Preprocessing
    from train import augment, data

    if datasets.is_folder(config.dataset):
        resize, crop = recipe.eval_resize, recipe.eval_crop
    elif info.default_resolution > data.SMALL_IMAGE_MAX_SIDE:
        resize, crop = round(resolution / augment.EVAL_CROP_FRACTION), resolution
    else:
        resize, crop = resolution, resolution
    return Preprocessing(tuple(recipe.mean), tuple(recipe.std), resize, crop, recipe.interpolation)


# What a checkpoint in a workdir belongs to: resuming with any of these changed would restore
# into the wrong model (or the other framework's run would start over and overwrite its metrics).
# Beside these, run.json records the class names and the preprocessing of the exported weights.


def run_identity(config: config_lib.Config, run_plan: Plan) -> dict:
    return {
        "framework": config.framework,
        "arch": config.arch,
        "width": config.width,
        "dataset": config.dataset,
        "num_classes": run_plan.num_classes,
        "resolution": run_plan.resolution,
        # Frozen parameters carry no optimizer state: a checkpoint holds that of one freezing.
        "frozen_blocks": run_plan.frozen_blocks,
    }


# What a run.json written before a key existed means by its absence.
IDENTITY_DEFAULTS = {"frozen_blocks": 0}


def workdir_problem(config: config_lib.Config, run_plan: Plan) -> str | None:
    """Why `config.workdir` cannot hold this run (it holds a different one), or None."""
    import json

    from train.checkpoint import RUN_FILE

    path = Path(config.workdir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"cannot read {path} ({e}): expected the JSON that train.main writes"
    current = run_identity(config, run_plan)
    previous = {**IDENTITY_DEFAULTS, **previous}
    changed = [f"{key} {previous.get(key)!r} -> {value!r}" for key, value in current.items() if previous.get(key) != value]
    if changed:
        return (
            f"{config.workdir} holds another run ({'; '.join(changed)}): resume it with its own flags "
            "or pass a new --workdir"
        )
    return None


def _write_run_file(config: config_lib.Config, run_plan: Plan, workdir: Path) -> None:
    import json

    from train.checkpoint import RUN_FILE

    path = workdir / RUN_FILE
    if path.is_file() or _process_index(config) != 0:
        return
    described = {
        **run_identity(config, run_plan),
        "class_names": list(run_plan.class_names),
        "preprocessing": None if run_plan.preprocessing is None else dataclasses.asdict(run_plan.preprocessing),
    }
    atomic_write_text(path, json.dumps(described, indent=1) + "\n")


def train_and_evaluate(config: config_lib.Config, run_plan: Plan) -> dict:
    """Train as `config` says; returns the last evaluation's metrics."""
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_run_file(config, run_plan, workdir)
    from train import step as step_lib

    step_lib.use_compilation_cache()  # both paths compile the initial state in JAX
    if config.framework == "torch":
        return _train_torch(config, run_plan, workdir)
    return _train_jax(config, run_plan, workdir)


# --- JAX -----------------------------------------------------------------------------------


def _train_jax(config, run_plan: Plan, workdir: Path) -> dict:
    import jax

    from train import checkpoint, distributed, metrics, step as step_lib

    mesh = distributed.make_mesh()
    state_sharding, batch_sharding = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    model = step_lib.model_for(config, run_plan.num_classes, run_plan.architecture, run_plan.frozen_blocks)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    pretrained = _pretrained_variables(run_plan, init_key)
    # Initialised under jit straight into the replicated sharding (device_put of host values onto
    # a multi-process sharding is refused; jit replicates host values passed in).
    initial = jax.jit(lambda key, variables: _initial_state(config, run_plan, model, key, variables), out_shardings=state_sharding)
    state = initial(init_key, pretrained)
    mngr = checkpoint.manager(workdir, config.keep_checkpoints)
    state = checkpoint.restore_latest(mngr, state)
    train_fn, eval_fn = step_lib.jit_steps(config.label_smoothing, state_sharding, batch_sharding)
    # Raw key data as numpy: jit replicates a host value on every process, where device_put of
    # a typed key onto a multi-process sharding is refused.
    dropout_key = np.asarray(jax.random.key_data(dropout_key))
    holder = {"state": state}

    def train(batch):
        holder["state"], step_metrics = train_fn(holder["state"], distributed.global_batch(batch, batch_sharding), dropout_key)
        return step_metrics

    def evaluate():
        totals = [eval_fn(holder["state"], distributed.global_batch(b, batch_sharding)) for b in _eval_batches(config, run_plan)]
        return metrics.summarise(jax.device_get(totals))

    def save():
        checkpoint.save(mngr, holder["state"])

    def export(name: str):
        if jax.process_index() == 0:
            state = holder["state"]
            params, batch_stats, step = jax.device_get((state.params, state.batch_stats, state.step))
            _export(run_plan, workdir, name, {"params": params, "batch_stats": batch_stats}, int(step))

    try:
        result = _loop(config, run_plan, workdir, int(jax.device_get(state.step)), train, evaluate, save, export)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    export("model")
    return result


def _initial_state(config, run_plan: Plan, model, key, pretrained):
    import jax

    from flax_mobilenet import init_variables
    from train import optim, step as step_lib

    # The optimizer's labels need the parameter tree: shapes first, then build.
    params = jax.eval_shape(lambda: init_variables(model, key, run_plan.resolution))["params"]
    optimizer = optim.make_optimizer(config, params, run_plan.steps_per_epoch, run_plan.architecture, run_plan.frozen_blocks)
    if pretrained is None:
        return step_lib.create_train_state(model, optimizer, key, run_plan.resolution)
    return step_lib.TrainState.create(
        apply_fn=model.apply, params=pretrained["params"], batch_stats=pretrained["batch_stats"], tx=optimizer
    )


def _pretrained_variables(run_plan: Plan, key) -> dict | None:
    """--init-from's variables for the model trained, or None without it: the checkpoint's, with a
    new classifier, initialised as torchvision initialises (normal(0, 0.01), zero bias; drawn from
    `key`), when its class count differs."""
    if run_plan.init is None:
        return None
    import flax.linen as nn
    import jax
    import numpy as np

    from flax_mobilenet.layers import classifier_init

    architecture = run_plan.architecture
    variables = jax.tree.map(np.asarray, run_plan.init.variables)
    if run_plan.init.architecture.num_classes != architecture.num_classes:
        head = nn.Dense(architecture.num_classes, kernel_init=classifier_init)
        params = head.init(key, np.zeros((1, architecture.num_features), np.float32))["params"]
        variables["params"][architecture.flax_classifier] = jax.device_get(params)
    return variables


# --- PyTorch ---------------------------------------------------------------------------------


def _train_torch(config, run_plan: Plan, workdir: Path) -> dict:
    import jax
    import torch

    import parity
    from flax_mobilenet import init_variables
    from parity import layouts
    from parity.layouts import to_flax
    from train import checkpoint, metrics, optim, step as step_lib, torch_step

    # Start from the weights JAX would start from, so the two runs differ only in the framework.
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    variables = _pretrained_variables(run_plan, init_key)
    if variables is None:
        flax_model = step_lib.model_for(config, run_plan.num_classes, run_plan.architecture)
        variables = jax.device_get(init_variables(flax_model, init_key, run_plan.resolution))
    model = parity.load_torch(_checkpoint(run_plan, variables))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    torch_step.freeze(model, run_plan.frozen_blocks)
    optimizer = torch_step.make_optimizer(config, model)
    start = torch_step.restore_checkpoint(checkpoint.torch_path(workdir), model, optimizer)
    learning_rates = optim.schedule_values(config, run_plan.steps_per_epoch)
    counter = {"step": start}

    def train(batch):
        torch_step.set_learning_rate(optimizer, float(learning_rates[counter["step"]]))
        # Dropout masks from (seed, step), as JAX folds its dropout key: a resumed run draws the
        # masks an uninterrupted one would, which one seed at the start would not give.
        torch.manual_seed(_step_seed(config.seed, counter["step"]))
        counter["step"] += 1
        return torch_step.train_step(
            model, optimizer, batch, config.label_smoothing, config.precision, clip_grad_norm=config.clip_grad_norm
        )

    def evaluate():
        totals = [torch_step.eval_step(model, b, config.precision) for b in _eval_batches(config, run_plan)]
        return metrics.summarise([{k: v.item() for k, v in t.items()} for t in totals])

    def save():
        torch_step.save_checkpoint(checkpoint.torch_path(workdir), model, optimizer, counter["step"])

    def export(name: str):
        state_dict = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        _export(run_plan, workdir, name, to_flax(state_dict, layouts.torchvision.rules(run_plan.architecture)), counter["step"])

    result = _loop(config, run_plan, workdir, start, train, evaluate, save, export)
    export("model")
    return result


# --- The loop, shared -----------------------------------------------------------------------

# curves.png is redrawn after an evaluation at most this often, and at the end: matplotlib takes
# a good part of a second to draw it, which after each of the default run's short epochs would be
# a sizeable share of the run (`python -m cProfile -s cumtime -m train.main` lists it under
# `plot_workdir`). Long epochs (a real dataset) still get one after each evaluation.
PLOT_INTERVAL_SECONDS = 30.0
BEST = "best"  # WORKDIR/best.msgpack and best.pth: the weights of the most accurate evaluation


def _loop(
    config,
    run_plan: Plan,
    workdir: Path,
    start: int,
    train: Callable,
    evaluate: Callable,
    save: Callable,
    export: Callable[[str], None] | None = None,
) -> dict:
    """Epochs of `train(batch) -> {"loss", "accuracy"}` from step `start`; `evaluate() -> dict`
    after each --eval-every epochs and at the end, `save()` every --checkpoint-every steps, and
    `export("best")` after an evaluation more accurate than every one before it.

    Losses are fetched from the device in windows (at logging and checkpoint steps, and at the
    end of each epoch), so that the host does not wait for every step; a window with a NaN or
    infinite loss stops the run before anything after that step is saved.
    """
    from train import metrics

    chief = _process_index(config) == 0
    spe, stop = run_plan.steps_per_epoch, run_plan.stop_step
    if chief:
        metrics.truncate_after(workdir, start)
    best = max((r["eval_accuracy"] for r in metrics.read(workdir) if "eval_accuracy" in r), default=-math.inf)
    result: dict = {}
    if start >= stop:
        _print(chief, f"{workdir}: already trained to step {start}; exporting the weights again")
        return result
    step, window, since, timer = start, [], start, time.perf_counter()
    images_per_second = 0.0
    last_plot, unplotted = -math.inf, True  # when curves.png was drawn; rows appended since
    for epoch in range(start // spe, math.ceil(stop / spe)):
        first = step - epoch * spe
        bar = tqdm(
            total=min(spe, stop - epoch * spe),
            initial=first,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="step",
            disable=not (config.progress and chief),
            mininterval=1.0,
            dynamic_ncols=True,
        )
        batches = _train_batches(config, run_plan, epoch, first)
        for batch in batches:
            window.append((step + 1, train(batch)))
            step += 1
            bar.update(1)
            at_log, at_save = step % config.log_every == 0, step % run_plan.checkpoint_every == 0
            if at_log or at_save or step % spe == 0 or step == stop:
                losses, accuracies = _check_window(window)
                elapsed = time.perf_counter() - timer
                images_per_second = (step - since) * config.batch_size / max(elapsed, 1e-9)
                if chief and at_log:
                    metrics.append(workdir, {"step": step, "train_loss": float(np.mean(losses[-config.log_every :]))})
                    unplotted = True
                bar.set_postfix(
                    loss=f"{losses[-1]:.4f}",
                    acc=f"{np.mean(accuracies):.3f}",
                    img_s=f"{images_per_second:.0f}",
                    run_eta=_eta((stop - step) * config.batch_size / max(images_per_second, 1e-9)),
                    refresh=False,
                )
                window, since, timer = [], step, time.perf_counter()
                if at_save and step < stop:
                    save()
            if step >= stop:
                break
        epoch_done = step == (epoch + 1) * spe
        if step >= stop or (epoch_done and (epoch + 1) % config.eval_every == 0):
            result = evaluate()
            if result["accuracy"] > best and export is not None:
                best = result["accuracy"]
                export(BEST)
            row = {"step": step, "epoch": epoch + 1, "eval_loss": result["loss"], "eval_accuracy": result["accuracy"]}
            if chief:
                metrics.append(workdir, row)
                unplotted = True
                if time.perf_counter() - last_plot >= PLOT_INTERVAL_SECONDS:
                    metrics.plot_workdir(workdir)
                    last_plot, unplotted = time.perf_counter(), False
            bar.set_postfix(eval_loss=f"{result['loss']:.4f}", eval_acc=f"{result['accuracy']:.4f}", img_s=f"{images_per_second:.0f}")
        bar.close()
        timer = time.perf_counter()  # evaluation is not training time
        if step >= stop or (epoch_done and step % run_plan.checkpoint_every != 0):
            save()
    if chief and unplotted:
        metrics.plot_workdir(workdir)
    return result


def _check_window(window: list) -> tuple[np.ndarray, np.ndarray]:
    import jax

    values = jax.device_get([m for _, m in window]) if window else []
    losses = np.array([float(v["loss"]) for v in values])
    accuracies = np.array([float(v["accuracy"]) for v in values])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise NonFiniteLoss(f"the training loss became {losses[bad[0]]} at step {window[bad[0]][0]}")
    return losses, accuracies


def _train_batches(config, run_plan: Plan, epoch: int, start_batch: int) -> Iterator[dict]:
    from train import data

    return data.train_batches(
        config.dataset,
        resolution=run_plan.resolution,
        global_batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        start_batch=start_batch,
        process_index=_process_index(config),
        process_count=_process_count(config),
        data_dir=config.data_dir,
        recipe=run_plan.recipe,
        workers=config.data_workers,
    )


def _eval_batches(config, run_plan: Plan) -> Iterator[dict]:
    from train import data

    return data.eval_batches(
        config.dataset,
        resolution=run_plan.resolution,
        global_batch_size=config.batch_size,
        process_index=_process_index(config),
        process_count=_process_count(config),
        data_dir=config.data_dir,
        recipe=run_plan.recipe,
        workers=config.data_workers,
    )


def _process_index(config) -> int:
    if config.framework != "jax":
        return 0
    import jax

    return jax.process_index()


def _process_count(config) -> int:
    if config.framework != "jax":
        return 1
    import jax

    return jax.process_count()


def _step_seed(seed: int, step: int) -> int:
    """A 64-bit seed for `step` of the run seeded `seed` (any Python int)."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), step]).generate_state(1, np.uint64)[0])


def _checkpoint(run_plan: Plan, variables: dict):
    """`variables` of the model trained as a parity.Checkpoint."""
    import jax
    import numpy as np

    import flax_mobilenet
    import parity

    # Writable copies: what jax.device_get returns is read-only, and torch.from_numpy warns on it.
    variables = jax.tree.map(np.array, variables)
    return parity.Checkpoint(
        flax_mobilenet.MobileNet(run_plan.architecture), variables, run_plan.architecture, run_plan.preprocessing, "flax"
    )


def _export(run_plan: Plan, workdir: Path, name: str, variables: dict, step: int) -> None:
    """WORKDIR/NAME.msgpack (its NAME.msgpack.json with the architecture, the preprocessing and
    the class names) and WORKDIR/NAME.pth (torchvision's layout), through parity."""
    import json

    import parity
    from parity import io as weights_io

    checkpoint = _checkpoint(run_plan, variables)
    parity.save(checkpoint, workdir / f"{name}.msgpack")
    description = weights_io.description_path(workdir / f"{name}.msgpack")
    described = {**json.loads(description.read_text()), "class_names": list(run_plan.class_names)}
    atomic_write_text(description, json.dumps(described, indent=1) + "\n")
    try:
        parity.save(checkpoint, workdir / f"{name}.pth", num_batches_tracked=step)
    except parity.LayoutError as e:  # a padding or epsilon torchvision's models cannot express
        _print(True, f"{workdir / name}.pth not written: {e}")


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _print(chief: bool, message: str) -> None:
    if chief:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    config = config_lib.parse_config(argv)
    allocator.keep_step_buffers()
    problem = datasets.dataset_problem(config.dataset, config.data_dir)
    if problem:
        fail(problem)
    if config.framework == "jax":
        from train import distributed

        distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    chief = _process_index(config) == 0
    # Process 0 alone writes the metrics and the exported weights, and holds the lock: the other
    # processes of a multi-host run may share its workdir. Taken before the set-up checks, which
    # can take minutes (a large folder's every image is opened), so that a second run refuses at once.
    held = lock.held(config.workdir) if chief else contextlib.nullcontext()
    try:
        with held:
            try:
                config, init = with_checkpoint(config)
                run_plan = plan(config, init)
            except ValueError as e:  # data.DataError, parity's errors included
                fail(str(e))
            train_and_evaluate(config, run_plan)
    except lock.WorkdirBusy as e:
        fail(str(e))
    except NonFiniteLoss as e:
        fail(f"{e}; stopped. {_last_checkpoint(config)}", status=1)
    if chief:
        print(summary(Path(config.workdir)))
    return 0


def summary(workdir: Path) -> str:
    """What a run wrote: its final and best evaluation, and the paths of its weights, metrics and
    curves."""
    from train import metrics

    evaluations = [r for r in metrics.read(workdir) if "eval_accuracy" in r]
    lines = []
    if evaluations:
        final = evaluations[-1]
        best = max(evaluations, key=lambda r: r["eval_accuracy"])  # the first of equals, as kept
        lines += [
            f"final: accuracy {final['eval_accuracy']:.4f}, eval loss {final['eval_loss']:.4f} (step {final['step']})",
            f"best:  accuracy {best['eval_accuracy']:.4f} (step {best['step']}): {_weights(workdir, BEST)}",
        ]
    lines += [
        f"weights: {_weights(workdir, 'model')}",
        f"metrics: {workdir / metrics.METRICS_FILE}",
        f"curves:  {workdir / metrics.CURVES_FILE}",
    ]
    return "\n".join(lines)


def _weights(workdir: Path, name: str) -> str:
    return ", ".join(str(path) for path in (workdir / f"{name}.msgpack", workdir / f"{name}.pth") if path.is_file())


def _last_checkpoint(config) -> str:
    from train import checkpoint

    if config.framework == "jax":
        directory = Path(config.workdir) / checkpoint.CHECKPOINT_DIR
        steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
        if steps:
            return f"The last good checkpoint is step {steps[-1]} in {directory}."
    elif (path := checkpoint.torch_path(config.workdir)).is_file():
        return f"The last good checkpoint is {path}."
    return "No checkpoint was written before it."


if __name__ == "__main__":
    sys.exit(main())
