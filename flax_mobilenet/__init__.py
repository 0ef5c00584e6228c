"""MobileNetV1 and MobileNetV2 in Flax, with PyTorch's numerics. Imports no torch."""

from flax_mobilenet.models import MobileNet, MobileNetV1, MobileNetV2, create_model, init_variables

__all__ = ["MobileNet", "MobileNetV1", "MobileNetV2", "create_model", "init_variables"]
