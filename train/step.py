"""The train and eval steps: pure functions of (state, batch), jitted by the caller.

    state = create_train_state(model, optimizer, jax.random.key(0), resolution=32)
    state, metrics = jax.jit(train_step)(state, batch, dropout_key)
    metrics = jax.jit(eval_step)(state, batch)

Under `jax.jit` with the batch sharded over a mesh (train/distributed.py) the means in the loss
and in BatchNorm are over the global batch: the step is written for one device and XLA inserts
the cross-device reductions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flax_mobilenet import MobileNet, init_variables, native


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the BatchNorm running statistics, which are state, not parameters."""

    batch_stats: Any


def programs_dir() -> Path:
    """Where XLA's compiled programs are kept between runs: beside the native kernels
    (`native.cache_dir()`), a folder per build of them (`native.build_id()`), so that a program
    compiled beside one build never runs with another's handlers."""
    return native.cache_dir() / "xla" / native.build_id()


def use_compilation_cache() -> None:
    """Keep compiled programs on disk between runs (JAX's persistent compilation cache), in
    `programs_dir()`, unless JAX_COMPILATION_CACHE_DIR (or jax.config) already names a directory;
    JAX_ENABLE_COMPILATION_CACHE=false turns it off.

    Most of a short run's compiling is the initial state (XLA:CPU compiles each of its random draws
    slowly); run again, the programs load from the cache. Not for the benchmarks, which time
    compilation."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(programs_dir()))


def model_for(config, num_classes: int, architecture=None, frozen_blocks: int = 0) -> MobileNet:
    """The Flax model `config` (train.config.Config) describes: `--precision bf16` computes in
    bfloat16 with float32 parameters. `architecture`: the model's description when it is not
    `config`'s arch, width and head (--init-from's); `frozen_blocks`: see `MobileNet.frozen_blocks`."""
    from train import plan

    dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
    return MobileNet(architecture or plan.train_architecture(config, num_classes), dtype, frozen_blocks)


def create_train_state(
    model: MobileNet, optimizer: optax.GradientTransformation, key: jax.Array, resolution: int
) -> TrainState:
    variables = init_variables(model, key, resolution)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optimizer
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy with label smoothing as `torch.nn.CrossEntropyLoss` does it
    (targets (1 - s) one-hot + s / classes)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(
    state: TrainState, batch: dict, dropout_key: jax.Array, label_smoothing: float = 0.0
) -> tuple[TrainState, dict]:
    """One optimizer step on `batch`; returns the new state and the batch's loss and accuracy.

    The dropout key is folded with the step number, so the same base key gives the same masks
    whether or not the run was interrupted.
    """
    key = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "accuracy": jnp.mean(correct(logits, batch["label"]))}


def eval_step(state: TrainState, batch: dict) -> dict:
    """Sums over the real examples of `batch` (`eval_sums`)."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    return eval_sums(logits, batch)


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the top class is the label, else 0.0: what accuracy averages."""
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def eval_sums(logits: jax.Array, batch: dict) -> dict:
    """Loss and correct predictions summed over the real examples of `batch` (mask 1), and their
    count: summed over batches by the caller (`train.metrics.summarise`), so that a padded last
    batch counts each example once."""
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    loss = cross_entropy(logits, batch["label"])
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct(logits, batch["label"]) * mask), "count": jnp.sum(mask)}


def jit_steps(label_smoothing: float, state_sharding=None, batch_sharding=None):
    """`(train_step, eval_step)` jitted, with the state replicated and the batch sharded when
    shardings are given.

    The old state is not donated: orbax's asynchronous save reads the saved state's buffers
    after `save` returns, and on the CPU a donated buffer is overwritten in place by the next
    step (a resumed run then started from a checkpoint holding a later step's values).
    """
    train = functools.partial(train_step, label_smoothing=label_smoothing)
    if state_sharding is None:
        return jax.jit(train), jax.jit(eval_step)
    train = jax.jit(
        train,
        in_shardings=(state_sharding, batch_sharding, state_sharding),
        out_shardings=(state_sharding, state_sharding),
    )
    evaluate = jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding), out_shardings=state_sharding)
    return train, evaluate
