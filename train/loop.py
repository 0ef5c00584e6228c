"""The training loop: epochs of steps of a runner (train/runners.py), and the periodic work
after each step as named actions (train/periodic.py), in this order:

    check losses      fetch the steps' losses from the device: at logging and checkpoint steps,
                      at each epoch's end, and at the last step; a NaN or infinite one stops the run
                      before anything after its step is saved
    log metrics       {"step", "train_loss"} to metrics.jsonl every --log-every steps
    report progress   the progress bar's loss, accuracy, images/s and time left, as often as losses are checked
    evaluate          every --eval-every epochs and at the end: {"step", "epoch", "eval_loss", "eval_accuracy"}
    export best       WORKDIR/best.msgpack and best.pth after an evaluation more accurate than any before
    report evaluation the progress bar's evaluation loss and accuracy
    plot              curves.png after an evaluation, at most every PLOT_INTERVAL_SECONDS (and at the end)
    restart the clock at each epoch's end: images/s counts training time, not evaluation
    checkpoint        every --checkpoint-every steps, at each epoch's end, and at the end

Process 0 alone writes the metrics and the curves. The data order depends only on (seed, epoch), so
a resumed run starts in the middle of its epoch and sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from train import metrics, periodic, record
from train.periodic import Action, AtMostEvery, Every
from train.plan import Plan

# curves.png is redrawn after an evaluation at most this often, and at the end: matplotlib takes
# a good part of a second to draw it, which after each of the default run's short epochs would be
# a sizeable share of the run (`python -m cProfile -s cumtime -m train.main` lists it under
# `plot_workdir`). Long epochs (a real dataset) still get one after each evaluation.
PLOT_INTERVAL_SECONDS = 30.0
BEST = "best"  # WORKDIR/best.msgpack and best.pth: the weights of the most accurate evaluation


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def train_and_evaluate(config, run_plan: Plan) -> dict:
    """Train as `config` says; returns the last evaluation's metrics. Writes run.json first, and
    the final weights (WORKDIR/model.msgpack, model.pth) last."""
    from train import runners

    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    described = record.describe(config, run_plan)
    if process_index(config) == 0:
        record.write_run_file(workdir, described)
    runner = runners.create(config, run_plan, workdir, described)
    try:
        result = run(config, run_plan, workdir, runner)
    finally:
        runner.close()
    runner.export("model")
    return result


def run(config, run_plan: Plan, workdir: Path, runner) -> dict:
    """Epochs of `runner`'s steps from `runner.step` to the plan's stop, and the actions after
    each; returns the last evaluation's {"loss", "accuracy"} ({} when none ran)."""
    chief = process_index(config) == 0
    spe, stop, start = run_plan.steps_per_epoch, run_plan.stop_step, runner.step
    if chief:
        metrics.truncate_after(workdir, start)
    if start >= stop:
        if chief:
            print(f"{workdir}: already trained to step {start}; exporting the weights again", flush=True)
        return {}
    if start and chief:
        print(f"{workdir}: resuming from the checkpoint of step {start} (of {stop})", flush=True)
    bar = ProgressBar(config.epochs, enabled=config.progress and chief)
    losses = LossWindow(runner, config.batch_size, stop)
    log = MetricsLog(workdir, enabled=chief)
    evaluation = Evaluation(runner, config, run_plan, log)
    actions = [
        Action("check losses", Every(steps=(config.log_every, run_plan.checkpoint_every), epochs=1), losses.check),
        Action("log metrics", Every(steps=config.log_every, last=False), lambda m: log.append({"step": m.step, "train_loss": losses.mean(config.log_every)})),
        Action("report progress", Every(steps=(config.log_every, run_plan.checkpoint_every), epochs=1), lambda m: bar.show(**losses.postfix())),
        Action("evaluate", Every(epochs=config.eval_every), evaluation.run),
        Action("export best", evaluation.improved, lambda m: runner.export(BEST)),
        Action("report evaluation", Every(epochs=config.eval_every), lambda m: bar.show(**evaluation.postfix(losses.images_per_second))),
        Action("plot", AtMostEvery(Every(epochs=config.eval_every), PLOT_INTERVAL_SECONDS), lambda m: log.plot()),
        # Evaluation is not training time.
        Action("restart the clock", Every(epochs=1), lambda m: losses.restart_clock()),
        Action("checkpoint", Every(steps=run_plan.checkpoint_every, epochs=1), lambda m: runner.save()),
    ]
    step = start
    for epoch in range(start // spe, math.ceil(stop / spe)):
        first = step - epoch * spe
        bar.begin(epoch, first, min(spe, stop - epoch * spe))
        for batch in _train_batches(config, run_plan, epoch, first):
            losses.add(runner.train(batch))
            step = runner.step
            bar.advance()
            if step == stop:
                break
            if step % spe:  # an epoch's last step waits for its batches to be released (below)
                periodic.run(actions, _moment(step, spe, stop))
        if step % spe == 0 or step == stop:
            periodic.run(actions, _moment(step, spe, stop))
        bar.end()
    if log.unplotted:
        log.plot()
    return evaluation.latest


def _moment(step: int, steps_per_epoch: int, stop: int) -> periodic.Moment:
    return periodic.Moment(step, (step - 1) // steps_per_epoch + 1, step % steps_per_epoch == 0, step == stop)


class LossWindow:
    """The training steps' metrics since the last check, left on the device until then (so that
    the host does not wait for every step), and the images per second over them."""

    def __init__(self, runner, batch_size: int, stop: int):
        self.runner, self.batch_size, self.stop = runner, batch_size, stop
        self.pending: list[tuple[int, dict]] = []
        self.losses, self.accuracies = np.zeros(0), np.zeros(0)
        self.images_per_second = 0.0
        self.since, self.clock = runner.step, time.perf_counter()

    def add(self, step_metrics: dict) -> None:
        self.pending.append((self.runner.step, step_metrics))

    def check(self, moment: periodic.Moment) -> None:
        values = self.runner.fetch([m for _, m in self.pending]) if self.pending else []
        self.losses = np.array([float(v["loss"]) for v in values])
        self.accuracies = np.array([float(v["accuracy"]) for v in values])
        bad = np.flatnonzero(~np.isfinite(self.losses))
        if bad.size:
            raise NonFiniteLoss(f"the training loss became {self.losses[bad[0]]} at step {self.pending[bad[0]][0]}")
        elapsed = time.perf_counter() - self.clock
        self.images_per_second = (moment.step - self.since) * self.batch_size / max(elapsed, 1e-9)
        self.pending, self.since, self.clock = [], moment.step, time.perf_counter()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def mean(self, last: int) -> float:
        return float(np.mean(self.losses[-last:]))

    def postfix(self) -> dict:
        left = (self.stop - self.since) * self.batch_size / max(self.images_per_second, 1e-9)
        return {
            "loss": f"{self.losses[-1]:.4f}",
            "acc": f"{np.mean(self.accuracies):.3f}",
            "img_s": f"{self.images_per_second:.0f}",
            "run_eta": _eta(left),
            "refresh": False,
        }


@dataclasses.dataclass
class MetricsLog:
    """metrics.jsonl rows (process 0 only), and whether curves.png lacks some of them."""

    workdir: Path
    enabled: bool
    unplotted: bool = False

    def append(self, row: dict) -> None:
        if self.enabled:
            metrics.append(self.workdir, row)
            self.unplotted = True

    def plot(self) -> None:
        if self.enabled:
            metrics.plot_workdir(self.workdir)
            self.unplotted = False


class Evaluation:
    """The runner's evaluation on the evaluation split, its metrics row, and the best accuracy so
    far (that of a resumed run's earlier evaluations included)."""

    def __init__(self, runner, config, run_plan: Plan, log: MetricsLog):
        self.runner, self.config, self.run_plan, self.log = runner, config, run_plan, log
        rows = metrics.read(log.workdir)
        self.best = max((r["eval_accuracy"] for r in rows if "eval_accuracy" in r), default=-math.inf)
        self.latest: dict = {}
        self.improved_at: int | None = None

    def run(self, moment: periodic.Moment) -> None:
        self.latest = self.runner.evaluate(_eval_batches(self.config, self.run_plan))
        if self.latest["accuracy"] > self.best:  # the first of equals stays the best
            self.best, self.improved_at = self.latest["accuracy"], moment.step
        self.log.append({"step": moment.step, "epoch": moment.epoch, "eval_loss": self.latest["loss"], "eval_accuracy": self.latest["accuracy"]})

    def improved(self, moment: periodic.Moment) -> bool:
        """Whether this step's evaluation was more accurate than every one before it."""
        return self.improved_at == moment.step

    def postfix(self, images_per_second: float) -> dict:
        return {"eval_loss": f"{self.latest['loss']:.4f}", "eval_acc": f"{self.latest['accuracy']:.4f}", "img_s": f"{images_per_second:.0f}"}


class ProgressBar:
    """One tqdm bar an epoch (process 0, unless --no-progress)."""

    def __init__(self, epochs: int, enabled: bool):
        self.epochs, self.enabled, self.bar = epochs, enabled, None

    def begin(self, epoch: int, first: int, total: int) -> None:
        self.bar = tqdm(
            total=total,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            unit="step",
            disable=not self.enabled,
            mininterval=1.0,
            dynamic_ncols=True,
        )

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, **postfix) -> None:
        self.bar.set_postfix(**postfix)

    def end(self) -> None:
        self.bar.close()


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _train_batches(config, run_plan: Plan, epoch: int, start_batch: int) -> Iterator[dict]:
    from train import data

    return data.train_batches(
        config.dataset,
        resolution=run_plan.resolution,
        global_batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        start_batch=start_batch,
        process_index=process_index(config),
        process_count=process_count(config),
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
        process_index=process_index(config),
        process_count=process_count(config),
        data_dir=config.data_dir,
        recipe=run_plan.recipe,
        workers=config.data_workers,
    )


def process_index(config) -> int:
    if config.framework != "jax":
        return 0
    import jax

    return jax.process_index()


def process_count(config) -> int:
    if config.framework != "jax":
        return 1
    import jax

    return jax.process_count()
