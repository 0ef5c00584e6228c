"""The PyTorch side of `--framework torch`: torch_ref, `torch.optim`, and steps mirroring train/step.py.

    model = torch_ref.create_model("v2", 1.0, num_classes=10)
    optimizer = make_optimizer(config, model)
    set_learning_rate(optimizer, lr)               # the value train/optim.py's schedule gives this step
    metrics = train_step(model, optimizer, batch)  # batch: the same NHWC numpy arrays JAX gets
    save_checkpoint(path, model, optimizer, step)  # step = restore_checkpoint(path, model, optimizer)

The optimizer is the one `train.optim.make_optimizer` mirrors: SGD or RMSprop with coupled weight
decay, or AdamW, in the param groups of `train.param_groups.parameter_group` (the backbone's learning-rate
factor, the depthwise filters' decay). `freeze(model, n)` freezes the first n blocks of `features`:
their parameters leave the optimizer, and `train_step` runs them in eval mode, since
`requires_grad=False` alone would still update their BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mobilenet_arch
from toolkit.cli import atomic_write
from train import param_groups


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


def parameter_blocks(architecture: mobilenet_arch.Architecture) -> dict[str, tuple[int | None, bool]]:
    """(index of its block in `features`, or None for a head layer; whether it is a depthwise
    filter) of every parameter name of the torch model `architecture` describes."""
    out: dict[str, tuple[int | None, bool]] = {}
    for index, block in enumerate(architecture.blocks):
        for layer in block.layers:
            out[f"{layer.torch_conv}.weight"] = (index, layer.depthwise)
            out[f"{layer.torch_bn}.weight"] = out[f"{layer.torch_bn}.bias"] = (index, False)
    for name in architecture.head.torch_names:
        for leaf in ("weight", "bias"):
            out[f"{name}.{leaf}"] = (None, False)
    return out


def freeze(model: torch.nn.Module, frozen_blocks: int) -> None:
    """Freeze the first `frozen_blocks` blocks of `model.features`: no gradient, no optimizer
    state (`make_optimizer` leaves them out), and eval mode in `train_step`."""
    for block in list(model.features)[:frozen_blocks]:
        block.requires_grad_(False)


def make_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.SGD, RMSprop or AdamW as `config` says, over the parameters that train, in
    `train.param_groups.parameter_group`'s groups; the learning rate is set every step."""
    blocks = parameter_blocks(model.architecture)
    groups: dict[param_groups.ParameterGroup, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(param_groups.parameter_group(config, *blocks[name]), []).append(p)
    torch_groups = [
        {"params": params, "weight_decay": group.weight_decay, "lr_mult": group.lr_mult} for group, params in groups.items()
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(torch_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            torch_groups,
            lr=config.lr,
            alpha=config.rmsprop_decay,
            eps=config.rmsprop_eps,
            momentum=config.momentum,
            centered=config.rmsprop_centered,
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=config.lr, betas=param_groups.ADAMW_BETAS, eps=param_groups.ADAMW_EPS)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: expected sgd, rmsprop or adamw")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """`lr` (the schedule's value) times each param group's factor."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def optimizer_step(optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None) -> None:
    """`optimizer.step()`, the gradients of its parameters first clipped to a global norm of
    `clip_grad_norm` (`torch.nn.utils.clip_grad_norm_`) when it is given."""
    if clip_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.step()


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
    clip_grad_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step on an NHWC numpy batch (moved to the model's device); returns the
    batch's loss and accuracy."""
    device = model_device(model)
    batch = to_torch(batch, device, memory_format)
    model.train()
    for block in model.features:
        if not any(p.requires_grad for p in block.parameters()):
            block.eval()  # frozen (see freeze): its BatchNorm keeps its statistics
    with _autocast(precision, device):
        logits = model(batch["image"])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in float32 at least
    loss = F.cross_entropy(logits, batch["label"], label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(optimizer, clip_grad_norm)
    return {"loss": loss.detach(), "accuracy": correct(logits, batch["label"]).mean()}


@torch.no_grad()
def eval_step(
    model: torch.nn.Module,
    batch: dict,
    precision: str = "fp32",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, torch.Tensor]:
    """Sums over the real examples of the batch, as train/step.py's eval_step (summed over
    batches by `train.metrics.summarise`)."""
    device = model_device(model)
    batch = to_torch(batch, device, memory_format)
    model.eval()
    with _autocast(precision, device):
        logits = model(batch["image"]).float()
    mask = batch.get("mask", torch.ones(batch["label"].shape, device=device))
    loss = F.cross_entropy(logits, batch["label"], reduction="none")
    return {"loss_sum": (loss * mask).sum(), "correct": (correct(logits, batch["label"]) * mask).sum(), "count": mask.sum()}


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the top class is the label, else 0.0: what accuracy averages."""
    return (logits.argmax(-1) == labels).float()


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
