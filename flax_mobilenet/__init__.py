"""MobileNetV1 and MobileNetV2 in Flax, with PyTorch's numerics. Imports no torch.

Importing it sets glibc's malloc up to keep a training step's buffers between steps
(`toolkit.allocator`; FLAX_MOBILENET_MALLOC=default opts out)."""

from toolkit import allocator

# Before JAX's first computation starts its threads: each picks its malloc arena at its first
# allocation.
allocator.keep_step_buffers()

from flax_mobilenet.models import MobileNet, MobileNetV1, MobileNetV2, create_model, init_variables  # noqa: E402

__all__ = ["MobileNet", "MobileNetV1", "MobileNetV2", "create_model", "init_variables"]
