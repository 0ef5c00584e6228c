"""`python -m train.main --arch v2 --width 1.0`: train, evaluate each epoch, checkpoint, export.

This is the command line: parse, check, lock, run, summarise. The run itself is elsewhere:

    flag checks (arch, values, dataset name)  -> one-line error, exit 2, before jax or torch is imported
                                                 (train/config.py, train/datasets.py)
    WORKDIR/.lock                             held for the run's life (train/lock.py)
    set-up checks (--init-from's weights, dataset on disk, devices, the workdir's run.json)
                                              -> one-line error, exit 2, before any work (train/plan.py)
    the run                                   train/loop.py: a runner (train/runners.py: JAX, or torch_ref
                                              on the same batches) and the periodic actions after each step
    the final and best accuracy, and where everything went

Fine-tuning (--init-from): the checkpoint gives the architecture, its weights (its head's hidden
layers and a new output layer when the class count differs; --head: a new head) and the
preprocessing the flags leave unsaid, and the run says in one line what it kept and replaced
(`plan.describe_init`); --head alone puts hidden dense layers before the classifier; --freeze and
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
import sys
from pathlib import Path

from toolkit import allocator
from toolkit.cli import fail
from train import config as config_lib
from train import datasets, lock, loop, plan


def main(argv: list[str] | None = None) -> int:
    config = config_lib.parse_config(argv)
    allocator.keep_step_buffers()
    problem = datasets.dataset_problem(config.dataset, config.data_dir)
    if problem:
        fail(problem)
    if config.framework == "jax":
        from train import distributed

        distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    chief = loop.process_index(config) == 0
    # Process 0 alone writes the metrics and the exported weights, and holds the lock: the other
    # processes of a multi-host run may share its workdir. Taken before the set-up checks, which
    # can take minutes (a large folder's every image is opened), so that a second run refuses at once.
    held = lock.held(config.workdir) if chief else contextlib.nullcontext()
    try:
        with held:
            try:
                config, init, notes = plan.with_checkpoint(config)
                run_plan = plan.make(config, init, notes)
            except ValueError as e:  # data.DataError, parity's errors included
                fail(str(e))
            if chief and init is not None:
                print(plan.describe_init(config, run_plan), flush=True)
            loop.train_and_evaluate(config, run_plan)
    except lock.WorkdirBusy as e:
        fail(str(e))
    except loop.NonFiniteLoss as e:
        fail(f"{e}; stopped. {_last_checkpoint(config)}", status=1)
    except KeyboardInterrupt:  # Ctrl-C: what is kept and how to go on, not a traceback
        kept = _last_checkpoint(config)
        fail(f"interrupted. {kept} " + ("The same command starts again." if kept.startswith("No checkpoint") else "The same command resumes from it."), status=130)
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
            f"best:  accuracy {best['eval_accuracy']:.4f} (step {best['step']}): {_weights(workdir, loop.BEST)}",
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
