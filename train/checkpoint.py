"""Checkpoints in WORKDIR/checkpoints: orbax-checkpoint for JAX, `torch.save` for the PyTorch path.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
while saving leaves the previous checkpoint intact and a resumed run never sees a partial one.
The PyTorch path gets the same guarantee from a temporary file and `os.replace`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import torch
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


def save_torch(workdir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    path = Path(workdir) / CHECKPOINT_DIR / TORCH_CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, f)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def restore_torch(workdir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the PyTorch checkpoint into `model` and `optimizer`; its step, or 0 when there is none."""
    path = Path(workdir) / CHECKPOINT_DIR / TORCH_CHECKPOINT
    if not path.is_file():
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return int(checkpoint["step"])
