"""What a run records about itself: `describe` writes it down once, and it goes to two places.

    WORKDIR/run.json        what the workdir holds: a resume checks the run's identity against it,
                            and a .pth exported there (which cannot carry it) is read with it
    WORKDIR/NAME.msgpack.json   beside each exported .msgpack: parity's architecture and
                            preprocessing, and the same record (`parity.save(..., extra=...)`)

`beside(weights)` reads it back for any weights file: train.predict's class names and
train.checkpoint's preprocessing of a .pth come from there. Nothing here imports jax or torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from toolkit.cli import atomic_write_text

RUN_FILE = "run.json"

# What a run.json written before a key existed means by its absence.
IDENTITY_DEFAULTS = {"frozen_blocks": 0, "hidden_units": []}


def identity(config, run_plan) -> dict:
    """What a checkpoint in a workdir belongs to: resuming with any of these changed would restore
    into the wrong model (or the other framework's run would start over and overwrite its metrics)."""
    return {
        "framework": config.framework,
        "arch": config.arch,
        "width": config.width,
        "dataset": config.dataset,
        "num_classes": run_plan.num_classes,
        # Another --head is another model; None: a plan built without one (the loop's tests).
        "hidden_units": [layer.units for layer in run_plan.architecture.head.hidden] if run_plan.architecture else [],
        "resolution": run_plan.resolution,
        # Frozen parameters carry no optimizer state: a checkpoint holds that of one freezing.
        "frozen_blocks": run_plan.frozen_blocks,
    }


def describe(config, run_plan) -> dict:
    """The run's record: its identity, its class names and its exported weights' preprocessing."""
    return {
        **identity(config, run_plan),
        "class_names": list(run_plan.class_names),
        # A .pth holds no activations: what its head's hidden layers apply, for --init-from and predict.
        "head_activation": _head_activation(run_plan),
        "preprocessing": None if run_plan.preprocessing is None else dataclasses.asdict(run_plan.preprocessing),
    }


def _head_activation(run_plan) -> str | None:
    hidden = run_plan.architecture.head.hidden if run_plan.architecture else ()
    return hidden[0].activation if hidden else None


def write_run_file(workdir: str | os.PathLike, described: dict) -> None:
    """WORKDIR/run.json, once: a resumed run finds its own there already."""
    path = Path(workdir) / RUN_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(described, indent=1) + "\n")


def workdir_problem(config, run_plan) -> str | None:
    """Why `config.workdir` cannot hold this run (it holds a different one), or None."""
    path = Path(config.workdir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"cannot read {path} ({e}): expected the JSON that train.main writes"
    current = identity(config, run_plan)
    previous = {**IDENTITY_DEFAULTS, **previous}
    changed = [f"{key} {previous.get(key)!r} -> {value!r}" for key, value in current.items() if previous.get(key) != value]
    if changed:
        return (
            f"{config.workdir} holds another run ({'; '.join(changed)}): resume it with its own flags "
            "or pass a new --workdir"
        )
    return None


def beside(weights: str | os.PathLike) -> dict:
    """The record of the run that wrote the weights file `weights`: a .msgpack's own description
    when it holds one, else the run.json of its folder; {} when neither says anything."""
    from parity import io as weights_io

    weights = Path(weights)
    own = read_json(weights_io.description_path(weights)) if weights.suffix.lower() == ".msgpack" else {}
    return own if "class_names" in own else read_json(weights.parent / RUN_FILE)


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is none to read."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
