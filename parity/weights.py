"""State-dict conversion between the PyTorch and Flax models, as rules derived from `mobilenet_arch`.

Every convolution and BatchNorm of the description gives the same handful of rules (as in
HF's `modeling_flax_pytorch_utils`): `weight` -> `kernel` with OIHW -> HWIO, BN `weight` -> `scale`,
`running_mean`/`running_var` -> `batch_stats` `mean`/`var`, the classifier transposed. There is no
per-layer special case: change the table in `mobilenet_arch` and the converter follows.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

import mobilenet_arch
from parity.layouts import ConversionError
from parity.layouts import flax as flax_layout
from parity.layouts import torchvision as torchvision_layout
from parity.layouts.detect import recognise
from parity.layouts.torchvision import expected_shapes, rules  # torchvision's layout is torch_ref's


def batches_tracked_keys(arch: mobilenet_arch.Architecture) -> list[str]:
    """PyTorch's BN step counters. Flax keeps none: they matter only with momentum=None."""
    return [f"{layer.torch_bn}.num_batches_tracked" for block in arch.blocks for layer in block.layers]


def _to_numpy(value: Any) -> np.ndarray:
    # Always a copy: a view would tie the converted weights to the source's memory (a PyTorch
    # model trained on after conversion would change the Flax variables, and a Flax array is
    # read-only memory that a PyTorch tensor must not write into).
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.float()  # bf16/fp16 checkpoints: numpy has no bf16
        return value.numpy().copy()
    return np.array(value, copy=True)


def _short_list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def num_classes_of(state_dict: Mapping[str, Any], arch: str) -> int:
    key = f"{mobilenet_arch.architecture(arch).torch_classifier}.bias"
    if key not in state_dict:
        raise ConversionError(f"no classifier in the state dict: key {key!r} is missing")
    return int(np.shape(state_dict[key])[0])


def infer_width(state_dict: Mapping[str, Any], arch: str) -> float | None:
    """The width multiplier whose torchvision shapes every weight in `state_dict` has, or None.
    Candidates come from the channels themselves, so any width is found, not only listed ones."""
    try:
        architecture = torchvision_layout.architecture(state_dict)
    except (ConversionError, KeyError, ValueError):
        return None
    if architecture.arch != arch:
        return None
    return torchvision_layout.infer_width(architecture)


def check_state_dict(state_dict: Mapping[str, Any], arch: mobilenet_arch.Architecture) -> None:
    """Raise ConversionError naming every missing and unexpected key, or the first wrong shape."""
    shapes = expected_shapes(arch)
    optional = set(batches_tracked_keys(arch))
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes and k not in optional]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_short_list(unexpected)}")
        if all(k.startswith("module.") for k in unexpected):
            problems.append("the keys start with 'module.': strip that DistributedDataParallel prefix first")
    if problems:
        raise ConversionError(f"state dict does not fit {_describe(arch)}: " + "; ".join(problems))
    for key, shape in shapes.items():
        got = tuple(np.shape(state_dict[key]))
        if got != shape:
            message = f"{key}: shape {got} in the weights, {shape} expected by {_describe(arch)}"
            width = infer_width(state_dict, arch.arch)
            if width is not None and width != arch.width_mult:
                message += f"; these weights have width {width}: use width_mult={width} (--width {width})"
            raise ConversionError(message)


def _describe(arch: mobilenet_arch.Architecture) -> str:
    return f"MobileNet{arch.arch.upper()} width {arch.width_mult} with {arch.num_classes} classes"


def torch_to_flax(state_dict: Mapping[str, Any], arch: str = "v2", width_mult: float | None = None) -> dict:
    """PyTorch state dict (torch_ref or torchvision keys) -> `{"params": ..., "batch_stats": ...}`.

    The width (when not given) and the number of classes are read from the shapes. Values come
    back as float32 numpy arrays, which `model.apply` takes as they are.
    """
    architecture = _torchvision_architecture(state_dict, arch) if width_mult is None else None
    if architecture is None:
        architecture = mobilenet_arch.architecture(arch, width_mult or 1.0, num_classes_of(state_dict, arch))
    check_state_dict(state_dict, architecture)
    variables: dict = {"params": {}, "batch_stats": {}}
    for rule in rules(architecture):
        node = variables
        for name in rule.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[rule.flax_path[-1]] = np.ascontiguousarray(rule.to_flax(_to_numpy(state_dict[rule.key])))
    return variables


def _torchvision_architecture(state_dict: Mapping[str, Any], arch: str) -> mobilenet_arch.Architecture | None:
    """The architecture torchvision-keyed weights have (any width), or None where the keys do not
    parse (check_state_dict then names what is missing)."""
    try:
        architecture = torchvision_layout.architecture(state_dict)
    except (ConversionError, KeyError):
        try:
            layout = recognise(state_dict)
        except ConversionError as e:
            raise ConversionError(str(e)) from None
        if layout != "torchvision":
            raise ConversionError(f"these are {layout} weights, not torchvision's: read them with parity.load") from None
        return None
    if architecture.arch != arch:
        raise ConversionError(
            f"these weights are MobileNet{architecture.arch.upper()} width {architecture.width_mult:g}, "
            f"MobileNet{arch.upper()} was asked for (--arch {architecture.arch})"
        )
    return architecture


def flax_to_torch(variables: Mapping[str, Any], arch: str = "v2", num_batches_tracked: int = 0) -> dict[str, torch.Tensor]:
    """Flax variables -> PyTorch state dict that loads strictly into torch_ref (and, for V2,
    torchvision's `mobilenet_v2`). Width, depth and classes are read from the variables' shapes.

    `num_batches_tracked` fills PyTorch's BN step counters (training passes its step count).
    """
    architecture = flax_layout.architecture(variables)
    if architecture.arch != arch:
        raise ConversionError(f"Flax variables of MobileNet{architecture.arch.upper()}, MobileNet{arch.upper()} was asked for")
    state_dict = {}
    for rule in rules(architecture):
        state_dict[rule.key] = torch.from_numpy(np.ascontiguousarray(rule.from_flax(_to_numpy(_lookup(variables, rule.flax_path)))))
    for key in batches_tracked_keys(architecture):
        state_dict[key] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return state_dict


def _lookup(variables: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = variables
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise ConversionError(f"Flax variables have no {'/'.join(path[: depth + 1])}: not a MobileNet of this arch?")
        node = node[name]
    return node
