"""The bridge between the PyTorch and Flax models: weight conversion and parity checks.

The only package that imports both torch and jax.
"""

from parity.checkpoint import Checkpoint, load, load_torch, save
from parity.io import WeightsFileError, load_flax_variables, load_torch_state_dict, save_torch_state_dict
from parity.layouts.flax import save_flax_variables
from parity.layouts import ConversionError, LayoutError, Preprocessing
from parity.weights import flax_to_torch, infer_width, load_as_flax, load_as_torch, torch_to_flax

__all__ = [
    "Checkpoint",
    "LayoutError",
    "Preprocessing",
    "load",
    "load_torch",
    "save",
    "ConversionError",
    "WeightsFileError",
    "flax_to_torch",
    "infer_width",
    "load_as_flax",
    "load_as_torch",
    "load_flax_variables",
    "load_torch_state_dict",
    "save_flax_variables",
    "save_torch_state_dict",
    "torch_to_flax",
]
