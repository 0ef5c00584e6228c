"""Reading and writing weights in PyTorch's and Flax's file formats.

    .pth / .pt     a PyTorch state dict, `torch.save`d (read with weights_only=True: loading never
                   runs code from a pickle); a dict holding it under "state_dict", "model" or
                   "model_state_dict" (a training checkpoint) is accepted too
    .safetensors   a PyTorch-keyed state dict (`safetensors.torch`)
    .msgpack       Flax variables `{"params": ..., "batch_stats": ...}` (`flax.serialization`)

    variables = load_as_flax("mobilenet_v2.pth", "v2", 1.0)    # any format, checked, as Flax variables
    save_flax_variables(variables, "model.msgpack")
    save_torch_state_dict(flax_to_torch(variables, "v2"), "model.pth")

A file that is missing, truncated or of another kind raises `WeightsFileError` with a one-line
message. Writes are atomic (`toolkit.cli.atomic_write`): a failure never leaves a
half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Literal, Mapping

import flax.serialization
import jax
import numpy as np
import safetensors.torch
import torch

import mobilenet_arch
from toolkit.cli import atomic_write
from parity.layouts import LayoutError, Preprocessing, WeightsFileError
from parity.layouts import flax as flax_layout
from parity.weights import ConversionError, check_state_dict, flax_to_torch, num_classes_of, rules, torch_to_flax

Framework = Literal["torch", "flax"]
FORMATS: dict[str, Framework] = {".pth": "torch", ".pt": "torch", ".bin": "torch", ".safetensors": "torch", ".msgpack": "flax"}
# Where training scripts commonly nest the state dict inside a checkpoint.
STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict")
# Where the classes of a `torch.save(model)` pickle live: a model, not tensors.
PICKLED_MODULES = ("torch.nn.modules", "torchvision.", "timm.", "transformers.", "torch_ref.")


def framework_of(path: str | os.PathLike) -> Framework:
    """"torch" or "flax", from the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise WeightsFileError(
            f"{path}: unknown extension {suffix or '(none)'!r}: expected .pth or .pt (PyTorch), "
            ".safetensors (PyTorch keys) or .msgpack (Flax)"
        )
    return FORMATS[suffix]


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The PyTorch state dict in a .pth, .pt or .safetensors file."""
    path = _existing(path, "torch")
    if path.suffix.lower() == ".safetensors":
        try:
            return dict(safetensors.torch.load(path.read_bytes()))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise WeightsFileError(f"{path} is not a readable safetensors file (truncated or another format?): {_first_line(e)}") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip, a pickle of other objects, a file of another kind
        if "Unsupported global" in str(e) and any(m in str(e) for m in PICKLED_MODULES):
            raise WeightsFileError(
                f"{path} holds a whole pickled model (torch.save(model)), which is never unpickled (that runs its code): "
                "save model.state_dict() instead"
            ) from e
        raise WeightsFileError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): {_first_line(e)}") from e
    if isinstance(loaded, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if isinstance(loaded.get(entry), Mapping):
                loaded = loaded[entry]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        what = f"a dict with keys {sorted(map(str, loaded))[:5]}" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise WeightsFileError(f"{path} holds {what}, not a state dict of tensors (nor one under {STATE_DICT_ENTRIES})")
    return dict(loaded)


def save_torch_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as .pth/.pt (`torch.save`) or .safetensors, atomically."""
    path = Path(path)
    if framework_of(path) != "torch":
        raise WeightsFileError(f"{path}: a PyTorch state dict goes to .pth, .pt or .safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix.lower() == ".safetensors":
        _atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors)))
    else:
        _atomic_write(path, lambda f: torch.save(tensors, f))


def load_flax_variables(path: str | os.PathLike) -> dict[str, Any]:
    """`{"params": ..., "batch_stats": ...}` (numpy leaves) from a .msgpack file."""
    path = _existing(path, "flax")
    try:
        variables = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types for truncated or foreign bytes
        raise WeightsFileError(f"{path} is not a readable Flax msgpack file (truncated or another format?): {_first_line(e)}") from e
    if not isinstance(variables, dict) or not {"params", "batch_stats"} <= variables.keys():
        found = sorted(map(str, variables))[:5] if isinstance(variables, dict) else type(variables).__name__
        raise WeightsFileError(f"{path} holds {found}, not Flax variables with 'params' and 'batch_stats'")
    # msgpack hands back read-only views of the file's bytes; copies are ordinary arrays.
    return jax.tree.map(np.array, {"params": variables["params"], "batch_stats": variables["batch_stats"]})


def save_flax_variables(
    variables: Mapping[str, Any], path: str | os.PathLike, architecture=None, preprocessing=None, extra: Mapping[str, Any] | None = None
) -> None:
    """Write `{"params", "batch_stats"}` to a .msgpack file, atomically, and beside it
    `<file>.json`: the architecture (inferred from the shapes when not given) and preprocessing,
    so that `parity.load(path)` needs no flags, and `extra`'s keys. The msgpack holds only arrays."""
    path = Path(path)
    if framework_of(path) != "flax":
        raise WeightsFileError(f"{path}: Flax variables go to .msgpack")
    tree = jax.device_get({"params": variables["params"], "batch_stats": variables["batch_stats"]})
    if architecture is None:
        try:
            architecture = flax_layout.architecture(tree)
        except LayoutError:  # not a MobileNet's tree: the weights alone, as asked
            architecture = None
    _atomic_write(path, lambda f: f.write(flax.serialization.msgpack_serialize(tree)))
    if architecture is not None:
        text = flax_layout.description_json(architecture, preprocessing or flax_layout.preprocessing(), extra)
        _atomic_write(description_path(path), lambda f: f.write(text.encode()))


def description_path(path: str | os.PathLike) -> Path:
    """Where a .msgpack's architecture and preprocessing are written: `<file>.json`."""
    return Path(f"{path}.json")


def read_description(path: str | os.PathLike):
    """(architecture, preprocessing) written beside a .msgpack, or (None, None) for an older file."""
    described = description_path(path)
    if not described.is_file():
        return None, None
    try:
        d = json.loads(described.read_text())
        return flax_layout.architecture_from_json(d["architecture"]), Preprocessing.from_dict(d["preprocessing"])
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsFileError(f"{described} is not a readable description of {Path(path).name} ({_first_line(e)}): delete it to infer the architecture from the shapes") from e


def load_as_flax(path: str | os.PathLike, arch: str, width_mult: float) -> dict[str, Any]:
    """Flax variables for `arch` at `width_mult` from a file of either framework, checked: wrong
    keys, shapes, architecture or width raise ConversionError saying what differs."""
    if framework_of(path) == "torch":
        return torch_to_flax(load_torch_state_dict(path), arch, width_mult)
    variables = load_flax_variables(path)
    check_flax_variables(variables, arch, width_mult)
    return variables


def load_as_torch(path: str | os.PathLike, arch: str, width_mult: float) -> dict[str, torch.Tensor]:
    """A PyTorch state dict for `arch` at `width_mult` from a file of either framework, checked."""
    if framework_of(path) == "flax":
        variables = load_flax_variables(path)
        check_flax_variables(variables, arch, width_mult)
        return flax_to_torch(variables, arch)
    state_dict = load_torch_state_dict(path)
    check_state_dict(state_dict, mobilenet_arch.architecture(arch, width_mult, num_classes_of(state_dict, arch)))
    return state_dict


def check_flax_variables(variables: Mapping[str, Any], arch: str, width_mult: float) -> None:
    """Raise ConversionError unless `variables` are exactly those of `arch` at `width_mult`."""
    state_dict = flax_to_torch(variables, arch)  # names missing entries; infers the width from shapes
    architecture = mobilenet_arch.architecture(arch, width_mult, num_classes_of(state_dict, arch))
    expected = {"/".join(rule.flax_path) for rule in rules(architecture)}
    found = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
    if found - expected:
        extra = sorted(found - expected)
        raise ConversionError(f"Flax variables have {len(extra)} entries MobileNet{arch.upper()} does not: {', '.join(extra[:5])}")
    check_state_dict(state_dict, architecture)  # the width, with the "use --width" hint


def _existing(path: str | os.PathLike, framework: Framework) -> Path:
    path = Path(path)
    if framework_of(path) != framework:
        raise WeightsFileError(f"{path}: expected a {framework} file")
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
    return path


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`toolkit.cli.atomic_write`, its missing directory a WeightsFileError like every other
    bad path."""
    try:
        atomic_write(path, write)
    except FileNotFoundError as e:  # "cannot write PATH: directory DIR does not exist"
        raise WeightsFileError(str(e)) from e


def _first_line(error: Exception) -> str:
    """The gist of a library's error: its first sentence (PyTorch's run on for several)."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def read_hf_directory(path: Path) -> tuple[dict[str, np.ndarray], dict, dict | None]:
    """(weights, config, preprocessor config or None) of a `save_pretrained` directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsFileError(f"{path}: a directory without config.json: expected a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state_dict = load_torch_state_dict(path / name)
            break
    else:
        raise WeightsFileError(f"{path}: no model.safetensors or pytorch_model.bin beside config.json")
    pre = path / "preprocessor_config.json"
    return state_dict, config, json.loads(pre.read_text()) if pre.is_file() else None
