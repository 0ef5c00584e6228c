"""Reading and writing weights in PyTorch's and Flax's file formats.

    .pth / .pt     a PyTorch state dict, `torch.save`d (read with weights_only=True: loading never
                   runs code from a pickle); a dict holding it under "state_dict", "model" or
                   "model_state_dict" (a training checkpoint) is accepted too
    .safetensors   a PyTorch-keyed state dict (`safetensors.torch`)
    .msgpack       Flax variables `{"params": ..., "batch_stats": ...}` (`flax.serialization`)

    state_dict = load_torch_state_dict("mobilenet_v2.pth")
    save_flax_variables(variables, "model.msgpack")      # and model.msgpack.json, its description
    save_torch_state_dict(state_dict, "model.safetensors")

Which layout the keys are in, and the conversion, are `parity.load`'s (`parity.checkpoint`); what
a .msgpack's description says is the Flax layout's (`parity.layouts.flax`).

A file that is missing, truncated or of another kind raises `WeightsFileError` with a one-line
message. Writes are atomic (`toolkit.cli.atomic_write`): a failure never leaves a
half-written file.
"""

from __future__ import annotations

import argparse
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Literal, Mapping

import flax.serialization
import jax
import numpy as np
import safetensors.torch
import torch

from parity.layouts import WeightsFileError
from toolkit.cli import atomic_write, first_line

Framework = Literal["torch", "flax"]
FORMATS: dict[str, Framework] = {".pth": "torch", ".pt": "torch", ".bin": "torch", ".safetensors": "torch", ".msgpack": "flax"}
# Where training frameworks nest the state dict inside a checkpoint (Lightning, torchvision's
# reference scripts, common loops; `module` where a DataParallel model was saved whole as a dict),
# and its EMA copy (timm's train.py, torchvision's references).
STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict", "module")
EMA_ENTRIES = ("state_dict_ema", "model_ema")
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


def load_torch_state_dict(path: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """The PyTorch state dict in a .pth, .pt or .safetensors file: the file's own, or the one a
    training checkpoint wraps (`unwrap`; `ema` chooses its EMA copy)."""
    path = _existing(path, "torch")
    if path.suffix.lower() == ".safetensors":
        try:
            loaded = dict(safetensors.torch.load(path.read_bytes()))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise WeightsFileError(f"{path} is not a readable safetensors file (truncated or another format?): {first_line(e)}") from e
        return unwrap(loaded, str(path), ema)
    try:
        # timm's and torchvision's training scripts save their argparse arguments beside the
        # weights; a Namespace only holds attributes, so unpickling one runs no code of the file's.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch's note on a pickle protocol it did not write: the error below says it in the user's terms
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip, a pickle of other objects, a file of another kind
        if "Unsupported global" in str(e) and any(m in str(e) for m in PICKLED_MODULES):
            raise WeightsFileError(
                f"{path} holds a whole pickled model (torch.save(model)), which is never unpickled (that runs its code): "
                "save model.state_dict() instead"
            ) from e
        if "Unsupported global" in str(e) or "unsupported GLOBAL" in str(e):
            raise WeightsFileError(f"{path} holds Python objects other than tensors and plain containers, which are never unpickled (that could run code): save the state dict alone") from e
        if "Unsupported operand" in str(e):  # the weights-only unpickler meets an opcode torch.save never writes
            raise WeightsFileError(f"{path} is a pickle of another writer (pickle.dump?), which is never unpickled (that could run code): save it with torch.save(state_dict)") from e
        raise WeightsFileError(f"{path} is not a readable PyTorch checkpoint: {_what_it_is(path)}") from e
    return unwrap(loaded, str(path), ema)


def _what_it_is(path: Path) -> str:
    """Why torch.load could not read `path`, in the user's terms (torch's own words, such as "pop
    from empty list" for a text file, say nothing to them)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    return "a zip archive, but not one torch.save wrote (no data.pkl inside)"
        return "a damaged or truncated zip archive (what torch.save writes)"
    if head[:1] == b"\x80":
        return "a damaged or truncated pickle"
    return "neither a zip archive (what torch.save writes) nor a pickle: another kind of file"


def unwrap(loaded: Any, where: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside what a training framework saved: the file's own dict of tensors, or
    the one under `STATE_DICT_ENTRIES` (Lightning's `state_dict`, torchvision's references'
    `model`, ...), or with `ema` its EMA copy (`EMA_ENTRIES`, as timm and torchvision save it).
    The other entries (optimizer, epoch, hyper-parameters) are named in a note; an EMA copy not
    asked for is named too, with how to choose it."""
    if _is_state_dict(loaded):
        if ema:
            raise WeightsFileError(f"{where} is a plain state dict: it holds no EMA copy (ema=True, --ema)")
        return dict(loaded)
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"{where} holds a {type(loaded).__name__}, not a state dict of tensors")
    emas = [k for k in EMA_ENTRIES if _is_state_dict(loaded.get(k))]
    plain = [k for k in STATE_DICT_ENTRIES if _is_state_dict(loaded.get(k))]
    if ema and not emas:
        raise WeightsFileError(f"{where} holds no EMA copy of the weights ({' or '.join(EMA_ENTRIES)}); entries: {', '.join(sorted(map(str, loaded))[:8])}")
    chosen = emas[0] if ema else plain[0] if plain else None
    if chosen is None and emas:
        raise WeightsFileError(f"{where} holds only an EMA copy of the weights, under {emas[0]!r}: ema=True (--ema) reads it")
    if not loaded:
        raise WeightsFileError(f"{where} holds an empty dict: no weights")
    if chosen is None:
        found = ", ".join(sorted(map(str, loaded))[:8])
        raise WeightsFileError(f"{where} holds a dict with entries {found}: not a state dict of tensors, nor one under {', '.join(STATE_DICT_ENTRIES + EMA_ENTRIES)}")
    others = [str(k) for k in loaded if k != chosen and k not in emas]
    notes = [f"read the weights under {chosen!r}"] + ([f"ignored {', '.join(others)}"] if others else [])
    if emas and not ema:
        notes.append(f"it also holds an EMA copy under {emas[0]!r}: ema=True (--ema) reads that instead")
    warnings.warn(f"a training checkpoint: {'; '.join(notes)}", stacklevel=2)
    return dict(loaded[chosen])


def _is_state_dict(value: Any) -> bool:
    """A non-empty dict of named arrays: torch tensors as saved, or numpy/JAX arrays as passed."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) and hasattr(v, "shape") and not isinstance(v, Mapping) for k, v in value.items())


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
        raise WeightsFileError(f"{path} is not a readable Flax msgpack file (truncated or another format?): {first_line(e)}") from e
    if not isinstance(variables, dict) or not {"params", "batch_stats"} <= variables.keys():
        found = sorted(map(str, variables))[:5] if isinstance(variables, dict) else type(variables).__name__
        raise WeightsFileError(f"{path} holds {found}, not Flax variables with 'params' and 'batch_stats'")
    # msgpack hands back read-only views of the file's bytes; copies are ordinary arrays.
    return jax.tree.map(np.array, {"params": variables["params"], "batch_stats": variables["batch_stats"]})


def write_flax_variables(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """`{"params", "batch_stats"}` (and nothing else) to a .msgpack file, atomically."""
    path = Path(path)
    if framework_of(path) != "flax":
        raise WeightsFileError(f"{path}: Flax variables go to .msgpack")
    tree = jax.device_get({"params": variables["params"], "batch_stats": variables["batch_stats"]})
    _atomic_write(path, lambda f: f.write(flax.serialization.msgpack_serialize(tree)))


def description_path(path: str | os.PathLike) -> Path:
    """Where a .msgpack's architecture and preprocessing are written: `<file>.json`."""
    return Path(f"{path}.json")


def write_text(path: str | os.PathLike, text: str) -> None:
    """A text file, atomically."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


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


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict's tensors as numpy arrays, float32 (numpy has no bfloat16) or float64."""
    return {k: _to_numpy(v) for k, v in state_dict.items()}


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
