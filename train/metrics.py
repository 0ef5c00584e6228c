"""WORKDIR/metrics.jsonl and the PNG of its curves.

One JSON object per line:
    {"step": 10, "train_loss": 1.93}                                          every --log-every steps
    {"step": 22, "epoch": 1, "eval_loss": 0.41, "eval_accuracy": 0.93}        after each evaluation
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolkit.cli import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def append(workdir: str | os.PathLike, row: dict) -> None:
    with open(Path(workdir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read(workdir: str | os.PathLike) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    # A run killed mid-write can leave a partial last line; it is dropped.
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_after(workdir: str | os.PathLike, step: int) -> None:
    """Drop rows past `step`: a resumed run rewrites what the killed one logged after its last
    checkpoint, so the file holds each step once."""
    rows = [r for r in read(workdir) if r["step"] <= step]
    atomic_write_text(Path(workdir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def summarise(totals: list[dict]) -> dict:
    """{"loss", "accuracy"} over an evaluation split from its batches' sums (a step module's
    `eval_step`: "loss_sum", "correct", "count", on the host), each real example counted once."""
    count = sum(float(t["count"]) for t in totals)
    return {
        "loss": sum(float(t["loss_sum"]) for t in totals) / count,
        "accuracy": sum(float(t["correct"]) for t in totals) / count,
    }


def plot(runs: dict[str, list[dict]], path: str | os.PathLike) -> None:
    """Training loss, eval loss and eval accuracy against step, one line per run, drawn into the
    PNG file `path` atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        evals = [(r["step"], r["eval_loss"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        if train:
            (line,) = ax_loss.plot(*zip(*train), label=f"{label} train", alpha=0.8)
            color = line.get_color()
        else:
            color = None
        if evals:
            steps, losses, accuracies = zip(*evals)
            ax_loss.plot(steps, losses, "o--", color=color, label=f"{label} eval")
            ax_acc.plot(steps, accuracies, "o-", color=color, label=label)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="eval accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_workdir(workdir: str | os.PathLike) -> None:
    plot({Path(workdir).name: read(workdir)}, Path(workdir) / CURVES_FILE)

