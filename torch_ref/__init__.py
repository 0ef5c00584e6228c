"""The PyTorch reference: MobileNetV1 and MobileNetV2 in plain PyTorch. Imports no jax."""

from torch_ref.models import MobileNet, MobileNetV1, MobileNetV2, create_model

__all__ = ["MobileNet", "MobileNetV1", "MobileNetV2", "create_model"]
