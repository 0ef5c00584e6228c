"""The PyTorch side of `--framework torch`: torch_ref, `torch.optim`, and steps mirroring train/step.py.

    model = torch_ref.create_model("v2", 1.0, num_classes=10)
    optimizer = make_optimizer(config, model)
    set_learning_rate(optimizer, lr)               # the value train/optim.py's schedule gives this step
    metrics = train_step(model, optimizer, batch)  # batch: the same NHWC numpy arrays JAX gets
    save_checkpoint(path, model, optimizer, step)  # step = restore_checkpoint(path, model, optimizer)

The optimizer is the one `train.optim.make_optimizer` mirrors: SGD or RMSprop with coupled weight
decay, the depthwise filters in their own param group when their decay differs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mobilenet_arch
from mobilenet_arch.cli import atomic_write


def to_torch(
    batch: dict, device: torch.device | str = "cpu", memory_format: torch.memory_format = torch.contiguous_format
) -> dict[str, torch.Tensor]:
    """NHWC numpy batch -> NCHW tensors on `device` (the layout torch's convolutions expect;
    `torch.channels_last` keeps NCHW shapes over NHWC memory)."""
    image = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["image"]).transpose(0, 3, 1, 2)))
    out = {"image": image.to(device, memory_format=memory_format, non_blocking=True)}
    out["label"] = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)).to(device, non_blocking=True)
    if "mask" in batch:
        out["mask"] = torch.from_numpy(np.asarray(batch["mask"], np.float32)).to(device, non_blocking=True)
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def depthwise_parameter_names(arch: str) -> set[str]:
    architecture = mobilenet_arch.architecture(arch)
    return {f"{l.torch_conv}.weight" for b in architecture.blocks for l in b.layers if l.depthwise}


def make_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.SGD or RMSprop as `config` says; the learning rate is set every step."""
    depthwise = depthwise_parameter_names(config.arch)
    named = list(model.named_parameters())
    if config.dw_weight_decay == config.weight_decay:
        groups = [{"params": [p for _, p in named], "weight_decay": config.weight_decay}]
    else:
        groups = [
            {"params": [p for n, p in named if n not in depthwise], "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if n in depthwise], "weight_decay": config.dw_weight_decay},
        ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            groups,
            lr=config.lr,
            alpha=config.rmsprop_decay,
            eps=config.rmsprop_eps,
            momentum=config.momentum,
            centered=config.rmsprop_centered,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}: expected sgd or rmsprop")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    label_smoothing: float = 0.0,
    precision: str = "fp32",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, torch.Tensor]:
    """One optimizer step on an NHWC numpy batch (moved to the model's device); returns the
    batch's loss and accuracy."""
    device = model_device(model)
    batch = to_torch(batch, device, memory_format)
    model.train()
    with _autocast(precision, device):
        logits = model(batch["image"])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in float32 at least
    loss = F.cross_entropy(logits, batch["label"], label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
    return {"loss": loss.detach(), "accuracy": accuracy}


@torch.no_grad()
def eval_step(
    model: torch.nn.Module,
    batch: dict,
    precision: str = "fp32",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, torch.Tensor]:
    """Sums over the real examples of the batch, as train/step.py's eval_step."""
    device = model_device(model)
    batch = to_torch(batch, device, memory_format)
    model.eval()
    with _autocast(precision, device):
        logits = model(batch["image"]).float()
    mask = batch.get("mask", torch.ones(batch["label"].shape, device=device))
    loss = F.cross_entropy(logits, batch["label"], reduction="none")
    correct = (logits.argmax(-1) == batch["label"]).float()
    return {"loss_sum": (loss * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Model, optimizer and step in one `torch.save`d file, written atomically: a run killed while
    saving leaves the previous checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def restore_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the checkpoint at `path` into `model` and `optimizer`; its step, or 0 when there is none."""
    path = Path(path)
    if not path.is_file():
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return int(checkpoint["step"])
