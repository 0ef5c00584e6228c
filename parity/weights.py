"""The torchvision-keyed API: a PyTorch state dict to Flax variables and back, for a given arch.

    variables = torch_to_flax(model.state_dict(), "v2")          # width and classes from the shapes
    state_dict = flax_to_torch(variables, "v2")                  # loads strictly into torch_ref/torchvision
    variables = load_as_flax("model.pth", "v2", 1.0)             # a file of either framework, checked

Thin wrappers over `parity.load`'s conversion with the torchvision layout's record: the same
rules, the same checks, the same errors.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch

import mobilenet_arch
from parity import io
from parity.checkpoint import convert
from parity.layouts import ConversionError, flat_variables, from_flax
from parity.layouts import flax as flax_layout
from parity.layouts import torchvision as torchvision_layout
from parity.layouts.registry import recognise
from parity.layouts.torchvision import expected_shapes, rules  # noqa: F401  (torchvision's layout is torch_ref's)


def batches_tracked_keys(arch: mobilenet_arch.Architecture) -> list[str]:
    """PyTorch's BN step counters. Flax keeps none: they matter only with momentum=None."""
    return [f"{layer.torch_bn}.num_batches_tracked" for block in arch.blocks for layer in block.layers]


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
    convert(io.to_numpy(state_dict), torchvision_layout.NAME, arch, describe_as=_describe(arch))


def _describe(arch: mobilenet_arch.Architecture) -> str:
    return f"MobileNet{arch.arch.upper()} width {arch.width_mult:g} with {arch.num_classes} classes"


def torch_to_flax(state_dict: Mapping[str, Any], arch: str = "v2", width_mult: float | None = None) -> dict:
    """PyTorch state dict (torch_ref or torchvision keys) -> `{"params": ..., "batch_stats": ...}`.

    The width (when not given) and the number of classes are read from the shapes. Values come
    back as float32 numpy arrays, which `model.apply` takes as they are.
    """
    weights = io.to_numpy(state_dict)
    architecture = _torchvision_architecture(weights, arch) if width_mult is None else None
    if architecture is None:
        architecture = mobilenet_arch.architecture(arch, width_mult or 1.0, num_classes_of(weights, arch))
    return convert(weights, torchvision_layout.NAME, architecture, describe_as=_describe(architecture))


def _torchvision_architecture(weights: Mapping[str, Any], arch: str) -> mobilenet_arch.Architecture | None:
    """The architecture torchvision-keyed weights have (any width), or None where the keys do not
    parse (the conversion then names what is missing)."""
    try:
        architecture = torchvision_layout.architecture(weights)
    except (ConversionError, KeyError):
        layout = recognise(weights)
        if layout != torchvision_layout.NAME:
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
    architecture = flax_layout.architecture(flat_variables(variables))
    if architecture.arch != arch:
        raise ConversionError(f"Flax variables of MobileNet{architecture.arch.upper()}, MobileNet{arch.upper()} was asked for")
    try:
        tensors = from_flax(_host(variables), rules(architecture))
    except ConversionError as e:
        raise ConversionError(f"{e}: not a MobileNet of this arch?") from None
    state_dict = {k: torch.from_numpy(v) for k, v in tensors.items()}
    for key in batches_tracked_keys(architecture):
        state_dict[key] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return state_dict


def _host(variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """Device arrays fetched to the host once, so that each leaf is read without a transfer."""
    import jax

    return jax.device_get(variables)


def load_as_flax(path: str | os.PathLike, arch: str, width_mult: float) -> dict[str, Any]:
    """Flax variables for `arch` at `width_mult` from a file of either framework, checked: wrong
    keys, shapes, architecture or width raise ConversionError saying what differs."""
    if io.framework_of(path) == "torch":
        return torch_to_flax(io.load_torch_state_dict(path), arch, width_mult)
    variables = io.load_flax_variables(path)
    check_flax_variables(variables, arch, width_mult)
    return variables


def load_as_torch(path: str | os.PathLike, arch: str, width_mult: float) -> dict[str, torch.Tensor]:
    """A PyTorch state dict for `arch` at `width_mult` from a file of either framework, checked."""
    if io.framework_of(path) == "flax":
        variables = io.load_flax_variables(path)
        check_flax_variables(variables, arch, width_mult)
        return flax_to_torch(variables, arch)
    state_dict = io.load_torch_state_dict(path)
    check_state_dict(state_dict, mobilenet_arch.architecture(arch, width_mult, num_classes_of(state_dict, arch)))
    return state_dict


def check_flax_variables(variables: Mapping[str, Any], arch: str, width_mult: float) -> None:
    """Raise ConversionError unless `variables` are exactly those of `arch` at `width_mult`."""
    weights = flat_variables(variables)
    try:
        found = flax_layout.architecture(weights)
        num_classes = found.num_classes
    except ConversionError:
        num_classes = int(np.shape(weights.get("params/classifier/kernel", np.zeros((0, 1000))))[-1])
    architecture = mobilenet_arch.architecture(arch, width_mult, num_classes)
    convert(weights, flax_layout.NAME, architecture, describe_as=f"Flax variables of {_describe(architecture)}")
