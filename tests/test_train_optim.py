"""The optax chains train like torch.optim.

Two levels: the optimizers alone (the same gradients fed to both for 20 steps: the update rules,
weight decay, momentum, eps placement and the per-step schedule must agree to float32 rounding),
and the whole train step (model, loss, BatchNorm, optimizer) on the same batches from the same
weights, for as many steps as float32 allows (see FULL_STEPS).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import parity
import torch_ref
from flax_mobilenet import create_model
from train import data, optim, torch_step
from train.config import parse_config
from train.step import TrainState, train_step

STEPS_PER_EPOCH, EPOCHS = 5, 4  # 20 steps; the schedule changes every warm-up step and every epoch
BATCH, RESOLUTION, CLASSES = 16, 64, 10
# MobileNetV1 at width 0.25: a small network with depthwise filters (for the weight-decay mask) and
# BatchNorm everywhere; no dropout, so both frameworks compute the same function.
ARCH, WIDTH = "v1", 0.25
# The whole train step is compared after one step, not 20: this network's training is chaotic in
# float32. Measured here (SGD, lr 0.002): after one step the parameters agree to 4e-9 relative L2;
# after three they differ by 1e-3 while having moved only 2e-3, and the losses by 1e-3 by step 4,
# because near-constant BatchNorm channels magnify the different summation orders of XLA and oneDNN
# (jitted and eager JAX diverge from each other the same way). The 20-step comparison is therefore
# made on the optimizers with shared gradients, where nothing amplifies rounding.
FULL_STEPS = 1

COMMON = ["--arch", ARCH, "--width", str(WIDTH), "--epochs", str(EPOCHS), "--batch-size", str(BATCH)]
SGD = COMMON + (
    "--optimizer sgd --lr 0.05 --momentum 0.9 --nesterov --weight-decay 1e-2 --schedule cosine "
    "--warmup-epochs 1 --label-smoothing 0.1"
).split()
RMSPROP = COMMON + (
    "--optimizer rmsprop --lr 0.01 --momentum 0.9 --rmsprop-decay 0.9 --rmsprop-eps 1e-3 --weight-decay 1e-2 "
    "--depthwise-weight-decay 0 --schedule exponential --lr-decay-rate 0.5 --warmup-epochs 1"
).split()
CENTERED = RMSPROP + ["--rmsprop-centered", "--momentum", "0"]


def _model_and_weights():
    torch.manual_seed(0)
    model = torch_ref.create_model(ARCH, WIDTH, CLASSES)
    # Copies: torch_to_flax's arrays may share memory with the parameters torch updates in place.
    variables = jax.tree.map(np.array, parity.torch_to_flax(model.state_dict(), ARCH, WIDTH))
    return model, variables


def _relative_l2(a_tree, b_tree) -> float:
    """||a - b|| / ||b|| over all leaves together."""
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a_tree)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b_tree)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _max_relative(a_tree, b_tree) -> float:
    """Largest |a - b| in a tensor over that tensor's largest |b| (at least 1e-12)."""
    errors = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-12), a_tree, b_tree)
    return max(jax.tree.leaves(errors))


@pytest.mark.parametrize("flags", [SGD, RMSPROP, CENTERED], ids=["sgd-nesterov", "rmsprop-masked-decay", "rmsprop-centered"])
def test_optimizers_take_the_same_twenty_steps_given_the_same_gradients(flags):
    config = parse_config(flags)
    model, variables = _model_and_weights()
    params = variables["params"]
    tx = optim.make_optimizer(config, params, STEPS_PER_EPOCH)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    optimizer = torch_step.make_optimizer(config, model)
    learning_rates = optim.schedule_values(config, STEPS_PER_EPOCH)
    rng = np.random.default_rng(0)
    for i in range(STEPS_PER_EPOCH * EPOCHS):
        torch_grads = {name: torch.from_numpy(rng.standard_normal(tuple(p.shape), dtype=np.float32)) for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.grad = torch_grads[name].clone()
        grads = parity.torch_to_flax({**model.state_dict(), **torch_grads}, ARCH, WIDTH)["params"]
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        torch_step.set_learning_rate(optimizer, float(learning_rates[i]))
        optimizer.step()
    trained = parity.torch_to_flax(model.state_dict(), ARCH, WIDTH)["params"]
    # float32 rounding of a few multiply-adds per step, over 20 steps: ~1e-7 relative, 1e-5 leaves room.
    assert _max_relative(params, trained) < 1e-5
    assert _max_relative(params, variables["params"]) > 1e-2  # and the weights did move


@pytest.mark.parametrize("flags", [SGD + ["--lr", "0.002"], RMSPROP + ["--lr", "0.0005"]], ids=["sgd", "rmsprop"])
def test_one_train_step_matches_pytorch_on_the_same_batch(flags):
    config = parse_config(flags)
    model, variables = _model_and_weights()
    tx = optim.make_optimizer(config, variables["params"], STEPS_PER_EPOCH)
    flax_model = create_model(ARCH, WIDTH, CLASSES)
    state = TrainState.create(apply_fn=flax_model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx)
    step = jax.jit(functools.partial(train_step, label_smoothing=config.label_smoothing))
    optimizer = torch_step.make_optimizer(config, model)
    learning_rates = optim.schedule_values(config, STEPS_PER_EPOCH)
    batches = data.train_batches("digits", resolution=RESOLUTION, global_batch_size=BATCH, seed=0, epoch=0)
    jax_losses, torch_losses = [], []
    for i, batch in enumerate(itertools.islice(batches, FULL_STEPS)):
        state, m = step(state, batch, jax.random.key(0))
        jax_losses.append(float(m["loss"]))
        torch_step.set_learning_rate(optimizer, float(learning_rates[i]))
        torch_losses.append(float(torch_step.train_step(model, optimizer, batch, config.label_smoothing)["loss"]))
    trained = parity.torch_to_flax(model.state_dict(), ARCH, WIDTH)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)  # one float32 forward pass
    # The update each framework made, compared with each other. Its error is the float32 error of
    # the training-mode gradient (see tests/test_parity_outputs.py: per tensor up to a few 1e-2 of
    # float64 in either framework, depending on the order of the sums), which RMSprop's first step
    # (g / sqrt(0.1 g^2 + eps)) passes on almost unscaled. Measured: UPDATE_ERRORS below. A wrong
    # optimizer rule (coupled vs decoupled decay, eps inside the root, momentum order) is off by
    # order 1. Running statistics are averages of activations: rounding only, measured 1e-7.
    jax_update = jax.tree.map(np.subtract, jax.device_get(state.params), variables["params"])
    torch_update = jax.tree.map(np.subtract, trained["params"], variables["params"])
    error = _relative_l2(jax_update, torch_update)
    print(f"one-step update relative L2 difference ({flags[1]}): {error:.2e}")
    assert error < 0.1
    assert _relative_l2(state.batch_stats, trained["batch_stats"]) < 1e-5
    assert _relative_l2(state.params, variables["params"]) > 1e-4  # the step did move the weights


# In float64 the whole step is compared tightly. Over many steps it cannot be: measured in float64
# with these SGD flags, the parameters agree to 1e-14 after step 1, 1e-9 after step 2, 3e-8 after
# step 3, then jump to 5e-4 at step 4 and reach 1.4e-1 by step 20 (the same on Gaussian-noise
# batches, and at 10x smaller learning rates). So 20 full steps are not asserted; see FULL_STEPS.
@pytest.mark.parametrize("flags", [SGD, RMSPROP], ids=["sgd", "rmsprop"])
def test_one_train_step_is_the_same_function_in_float64(flags, capsys):
    """The whole step (model, label-smoothed loss, training-mode BatchNorm and its statistics,
    weight decay, optimizer, schedule) from the same weights on the same batch."""
    config = parse_config(flags)
    model, variables = _model_and_weights()
    model = model.double()
    batch = next(data.train_batches("digits", resolution=RESOLUTION, global_batch_size=BATCH, seed=0, epoch=0))
    batch = {"image": batch["image"].astype(np.float64), "label": batch["label"]}
    optimizer = torch_step.make_optimizer(config, model)
    torch_step.set_learning_rate(optimizer, float(optim.schedule_values(config, STEPS_PER_EPOCH)[0]))
    torch_step.train_step(model, optimizer, batch, config.label_smoothing)
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        tx = optim.make_optimizer(config, variables["params"], STEPS_PER_EPOCH)
        flax_model = create_model(ARCH, WIDTH, CLASSES, dtype=jnp.float64)
        state = TrainState.create(
            apply_fn=flax_model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
        )
        state, _ = jax.jit(functools.partial(train_step, label_smoothing=config.label_smoothing))(
            state, batch, jax.random.key(0)
        )
        params, batch_stats = jax.device_get((state.params, state.batch_stats))
    trained = parity.torch_to_flax(model.state_dict(), ARCH, WIDTH)
    jax_update = jax.tree.map(np.subtract, params, variables["params"])
    torch_update = jax.tree.map(np.subtract, trained["params"], variables["params"])
    update_error = _relative_l2(jax_update, torch_update)
    stats_error = _relative_l2(batch_stats, trained["batch_stats"])
    with capsys.disabled():
        print(f"\none float64 step ({flags[flags.index('--optimizer') + 1]}): update {update_error:.1e}, stats {stats_error:.1e}")
    # float64 rounding only (measured ~1e-12 on the update); a different loss, BatchNorm, weight
    # decay or optimizer rule is off by 1e-3 or more.
    assert update_error < 1e-9
    assert stats_error < 1e-9
    assert _relative_l2(params, variables["params"]) > 1e-4  # the step did move the weights


def test_depthwise_mask_marks_only_depthwise_filters():
    params = jax.eval_shape(lambda: create_model("v1", 0.25, CLASSES).init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False))["params"]
    mask = optim.depthwise_mask(params, "v1")
    marked = {"/".join(k.key for k in path) for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
    assert marked == {f"features_{i}/depthwise/conv/kernel" for i in range(1, 14)}


def test_presets_set_the_papers_recipes_and_explicit_flags_override_them():
    v2 = parse_config(["--preset", "v2-paper"])
    assert (v2.arch, v2.optimizer, v2.lr, v2.rmsprop_decay, v2.momentum) == ("v2", "rmsprop", 0.045, 0.9, 0.9)
    assert (v2.schedule, v2.lr_decay_rate, v2.weight_decay) == ("exponential", 0.98, 4e-5)
    v1 = parse_config(["--preset", "v1-paper"])
    assert (v1.arch, v1.optimizer, v1.depthwise_weight_decay) == ("v1", "rmsprop", 0.0)
    assert parse_config(["--preset", "torchvision-sgd"]).optimizer == "sgd"
    overridden = parse_config(["--preset", "v2-paper", "--lr", "0.1", "--arch", "v1"])
    assert (overridden.lr, overridden.arch, overridden.optimizer) == (0.1, "v1", "rmsprop")
