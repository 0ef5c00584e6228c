"""The 3x3 depthwise layer alone (stride 1 and 2): forward, and forward plus backward (the gradients
with respect to input and kernel of sum(y^2)/2), for each JAX implementation and PyTorch."""

from __future__ import annotations

import statistics

from bench import timing

# A layer of MobileNetV2's 56 x 56 stage.
BATCH, SIZE, CHANNELS = 32, 56, 144
SHAPE = f"3x3 depthwise, batch {BATCH}, {SIZE}x{SIZE}, {CHANNELS} ch"


def depthwise_microbench(repeats: int, batch: int = BATCH, size: int = SIZE, channels: int = CHANNELS) -> list[dict]:
    """One row per stride, implementation and phase, with the median and every repeat in ms."""
    import jax
    import jax.numpy as jnp
    import torch

    from flax_mobilenet import depthwise as dw

    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, channels))
    xt = torch.randn(batch, channels, size, size, requires_grad=True)
    kt = torch.randn(channels, 1, 3, 3, requires_grad=True)
    rows = []
    for stride in (1, 2):
        steps = {}
        impls = (("jax xla", dw.xla_depthwise_conv2d), ("jax shifted", dw.shifted_depthwise_conv2d), ("jax native", dw.native_depthwise_conv2d))
        for name, fn in impls:
            forward = jax.jit(lambda x, k, fn=fn: fn(x, k, stride, 1))
            backward = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(jnp.square(fn(x, k, stride, 1))) / 2, (0, 1)))
            steps[(name, "forward")] = lambda f=forward: jax.block_until_ready(f(x, kernel))
            steps[(name, "forward+backward")] = lambda f=backward: jax.block_until_ready(f(x, kernel))

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1, groups=channels)

        def torch_backward():
            y = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1, groups=channels)
            (y.square().sum() / 2).backward()
            xt.grad = kt.grad = None

        steps[("torch", "forward")] = torch_forward
        steps[("torch", "forward+backward")] = torch_backward
        times = timing.take_turns(steps, repeats, min_repeat_seconds=0)
        for (name, phase), ts in times.items():
            rows.append({"stride": stride, "impl": name, "phase": phase, "ms": 1e3 * statistics.median(ts), "runs_ms": [1e3 * t for t in ts]})
    return rows


def depthwise_table(rows: list[dict], shape: str = SHAPE) -> str:
    lines = [f"| {shape} | stride | impl | median ms |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['phase']} | {row['stride']} | {row['impl']} | {row['ms']:.1f} |")
    return "\n".join(lines)
