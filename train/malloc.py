"""The command-line tools' name for `mobilenet_arch.allocator`: they call `keep_step_buffers()`
first thing, as `import flax_mobilenet` does (see there for why and what it costs)."""

from mobilenet_arch.allocator import ENV_VAR, SETTINGS, keep_step_buffers

__all__ = ["ENV_VAR", "SETTINGS", "keep_step_buffers"]
