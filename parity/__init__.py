"""The bridge between the PyTorch and Flax models: weight conversion and parity checks.

The only package that imports both torch and jax.
"""

from parity.weights import ConversionError, flax_to_torch, infer_width, torch_to_flax

__all__ = ["ConversionError", "flax_to_torch", "infer_width", "torch_to_flax"]
