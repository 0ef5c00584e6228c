"""`python -m train.main --arch v2 --width 1.0`: train, evaluate each epoch, checkpoint, export.

    train_and_evaluate(config)
        flag checks (arch, values, dataset name)  -> one-line error, exit 2, before jax or torch is imported
        set-up checks (dataset on disk, devices)  -> one-line error, exit 2, before any work
        jax:   state replicated over a mesh, batches sharded      (train/step.py, distributed.py)
        torch: torch_ref on the same batches, the same schedule   (train/torch_step.py)
        loop:  progress bar, metrics.jsonl + curves.png, checkpoints, NaN stop
        WORKDIR/model.msgpack and WORKDIR/model.pth              (through parity)

A run started again in the same workdir resumes from its latest checkpoint; data order depends
only on (seed, epoch) and dropout keys on (seed, step), so the resumed run ends where an
uninterrupted one would. The PyTorch path seeds its dropout masks from (seed, step) too.

Flags are parsed and checked before jax or torch is imported (which takes seconds), so a mistyped
flag fails at once; the frameworks are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from mobilenet_arch.cli import atomic_write_text, fail
from train import config as config_lib
from train import malloc


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


def plan(config: config_lib.Config) -> Plan:
    """Check the flags against the dataset and the devices; raise ValueError with a one-line
    message when they do not fit."""
    from train import data, distributed

    info = data.dataset_info(config.dataset, config.data_dir)
    resolution = config.resolution or info.default_resolution
    problem = config_lib.resolution_problem(config.arch, resolution)
    if problem:
        raise ValueError(problem)
    if config.framework == "jax":
        problem = distributed.check_batch_size(config.batch_size)
        if problem:
            raise ValueError(problem)
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size, config.data_dir)
    total = config.epochs * steps_per_epoch
    stop = min(total, config.max_steps or total)
    run_plan = Plan(info.num_classes, resolution, steps_per_epoch, total, stop, config.checkpoint_every or steps_per_epoch)
    problem = workdir_problem(config, run_plan)
    if problem:
        raise ValueError(problem)
    return run_plan


# What a checkpoint in a workdir belongs to: resuming with any of these changed would restore
# into the wrong model (or the other framework's run would start over and overwrite its metrics).
RUN_FILE = "run.json"


def run_identity(config: config_lib.Config, run_plan: Plan) -> dict:
    return {
        "framework": config.framework,
        "arch": config.arch,
        "width": config.width,
        "dataset": config.dataset,
        "num_classes": run_plan.num_classes,
        "resolution": run_plan.resolution,
    }


def workdir_problem(config: config_lib.Config, run_plan: Plan) -> str | None:
    """Why `config.workdir` cannot hold this run (it holds a different one), or None."""
    import json

    path = Path(config.workdir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"cannot read {path} ({e}): expected the JSON that train.main writes"
    current = run_identity(config, run_plan)
    changed = [f"{key} {previous.get(key)!r} -> {value!r}" for key, value in current.items() if previous.get(key) != value]
    if changed:
        return (
            f"{config.workdir} holds another run ({'; '.join(changed)}): resume it with its own flags "
            "or pass a new --workdir"
        )
    return None


def _write_run_file(config: config_lib.Config, run_plan: Plan, workdir: Path) -> None:
    import json

    path = workdir / RUN_FILE
    if path.is_file() or _process_index(config) != 0:
        return
    atomic_write_text(path, json.dumps(run_identity(config, run_plan), indent=1) + "\n")


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

    import parity
    from train import checkpoint, distributed, step as step_lib

    mesh = distributed.make_mesh()
    state_sharding, batch_sharding = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    model = step_lib.model_for(config, run_plan.num_classes)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    # Initialised under jit straight into the replicated sharding (device_put of host values onto
    # a multi-process sharding is refused).
    state = jax.jit(lambda key: _initial_state(config, run_plan, model, key), out_shardings=state_sharding)(init_key)
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
        return _summarise(jax.device_get(totals))

    def save():
        checkpoint.save(mngr, holder["state"])

    try:
        result = _loop(config, run_plan, workdir, int(jax.device_get(state.step)), train, evaluate, save)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    if jax.process_index() == 0:
        variables = jax.device_get({"params": holder["state"].params, "batch_stats": holder["state"].batch_stats})
        _export(config, workdir, variables, parity.flax_to_torch(variables, config.arch, int(holder["state"].step)))
    return result


def _initial_state(config, run_plan: Plan, model, key):
    import jax

    from flax_mobilenet import init_variables
    from train import optim, step as step_lib

    # The optimizer's mask needs the parameter tree: initialise once to get it, then build.
    params = jax.eval_shape(lambda: init_variables(model, key, run_plan.resolution))["params"]
    optimizer = optim.make_optimizer(config, params, run_plan.steps_per_epoch)
    return step_lib.create_train_state(model, optimizer, key, run_plan.resolution)


# --- PyTorch ---------------------------------------------------------------------------------


def _train_torch(config, run_plan: Plan, workdir: Path) -> dict:
    import jax
    import torch

    import parity
    import torch_ref
    from flax_mobilenet import init_variables
    from train import checkpoint, optim, step as step_lib, torch_step

    if config.dropout is None:
        model = torch_ref.create_model(config.arch, config.width, run_plan.num_classes)
    else:
        model = torch_ref.create_model(config.arch, config.width, run_plan.num_classes, dropout=config.dropout)
    # Start from the weights JAX would start from, so the two runs differ only in the framework.
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    variables = init_variables(step_lib.model_for(config, run_plan.num_classes), init_key, run_plan.resolution)
    model.load_state_dict(parity.flax_to_torch(jax.device_get(variables), config.arch))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
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
        return torch_step.train_step(model, optimizer, batch, config.label_smoothing, config.precision)

    def evaluate():
        totals = [torch_step.eval_step(model, b, config.precision) for b in _eval_batches(config, run_plan)]
        return _summarise([{k: v.item() for k, v in t.items()} for t in totals])

    def save():
        torch_step.save_checkpoint(checkpoint.torch_path(workdir), model, optimizer, counter["step"])

    result = _loop(config, run_plan, workdir, start, train, evaluate, save)
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    variables = parity.torch_to_flax(state_dict, config.arch, config.width)
    _export(config, workdir, variables, state_dict)
    return result


# --- The loop, shared -----------------------------------------------------------------------

# curves.png is redrawn after an evaluation at most this often, and at the end: matplotlib takes
# a good part of a second to draw it, which after each of the default run's short epochs would be
# a sizeable share of the run (`python -m cProfile -s cumtime -m train.main` lists it under
# `plot_workdir`). Long epochs (a real dataset) still get one after each evaluation.
PLOT_INTERVAL_SECONDS = 30.0


def _loop(config, run_plan: Plan, workdir: Path, start: int, train: Callable, evaluate: Callable, save: Callable) -> dict:
    """Epochs of `train(batch) -> {"loss", "accuracy"}` from step `start`; `evaluate() -> dict`
    after each --eval-every epochs and at the end, `save()` every --checkpoint-every steps.

    Losses are fetched from the device in windows (at logging and checkpoint steps, and at the
    end of each epoch), so that the host does not wait for every step; a window with a NaN or
    infinite loss stops the run before anything after that step is saved.
    """
    from train import metrics

    chief = _process_index(config) == 0
    spe, stop = run_plan.steps_per_epoch, run_plan.stop_step
    if chief:
        metrics.truncate_after(workdir, start)
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


def _summarise(totals: list[dict]) -> dict:
    count = sum(float(t["count"]) for t in totals)
    return {
        "loss": sum(float(t["loss_sum"]) for t in totals) / count,
        "accuracy": sum(float(t["correct"]) for t in totals) / count,
    }


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


def _export(config, workdir: Path, variables: dict, state_dict: dict) -> None:
    from parity import io as weights_io

    weights_io.save_flax_variables(variables, workdir / "model.msgpack")
    weights_io.save_torch_state_dict(state_dict, workdir / "model.pth")


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _print(chief: bool, message: str) -> None:
    if chief:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    config = config_lib.parse_config(argv)
    malloc.keep_step_buffers()
    problem = config_lib.dataset_problem(config.dataset, config.data_dir)
    if problem:
        fail(problem)
    if config.framework == "jax":
        from train import distributed

        distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    try:
        run_plan = plan(config)
    except ValueError as e:  # data.DataError included
        fail(str(e))
    try:
        result = train_and_evaluate(config, run_plan)
    except NonFiniteLoss as e:
        fail(f"{e}; stopped. {_last_checkpoint(config)}", status=1)
    if result and _process_index(config) == 0:
        print(f"eval_loss={result['loss']:.4f} accuracy={result['accuracy']:.4f}")
    return 0


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
