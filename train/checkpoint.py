"""Checkpoints in WORKDIR/checkpoints: orbax-checkpoint for JAX; the PyTorch path's one file
(`TORCH_CHECKPOINT`) is written and read by train/torch_step.py. `load_pretrained`: the weights a
run starts from (--init-from) or predicts with.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
while saving leaves the previous checkpoint intact and a resumed run never sees a partial one.
The PyTorch path's file is written atomically for the same guarantee.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import serialization

CHECKPOINT_DIR = "checkpoints"
TORCH_CHECKPOINT = "checkpoint.pth"


def manager(workdir: str | os.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, state) -> None:
    """Save `state` (a TrainState) under its step; returns while the write finishes in the background."""
    mngr.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(serialization.to_state_dict(state)))


def restore_latest(mngr: ocp.CheckpointManager, state):
    """`state` with the latest checkpoint's values and `state`'s shardings, or `state` itself
    when there is none."""
    step = mngr.latest_step()
    if step is None:
        return state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, serialization.to_state_dict(state))
    restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return serialization.from_state_dict(state, restored)


def load_pretrained(source: str | os.PathLike, **overrides):
    """`parity.load(source, **overrides)`; for a PyTorch file written by train.main (model.pth,
    best.pth), which cannot carry its preprocessing, class names and head activation, those its run
    recorded (train/record.py)."""
    import dataclasses

    import parity
    from parity.layouts.torchvision import TORCH_SUFFIXES
    from train import record

    path = Path(source)
    recorded = record.beside(path) if path.suffix.lower() in TORCH_SUFFIXES else {}
    if recorded and "preprocessing" not in overrides:
        try:
            overrides["preprocessing"] = parity.Preprocessing.from_dict(recorded["preprocessing"])
        except (KeyError, TypeError, ValueError):
            pass  # not a run's file: the layout's own preprocessing
    if isinstance(recorded.get("head_activation"), str) and "head_activation" not in overrides:
        overrides["head_activation"] = recorded["head_activation"]
    checkpoint = parity.load(source, **overrides)
    names = recorded.get("class_names")
    if checkpoint.labels is None and isinstance(names, list) and len(names) == checkpoint.architecture.num_classes and all(isinstance(n, str) for n in names):
        checkpoint = dataclasses.replace(checkpoint, labels=tuple(names))  # a folder's run.json of another run's classes is left out
    return checkpoint


def torch_path(workdir: str | os.PathLike) -> Path:
    """Where the PyTorch path keeps its latest checkpoint."""
    return Path(workdir) / CHECKPOINT_DIR / TORCH_CHECKPOINT
