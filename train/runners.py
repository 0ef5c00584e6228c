"""One run's model, optimizer and checkpoints behind one interface, in JAX or in PyTorch.

    runner = create(config, run_plan, workdir, described)    # a JaxRunner or a TorchRunner
    runner.step                       steps done (a resumed run starts past 0)
    runner.train(batch)               one optimizer step -> the batch's loss and accuracy
    runner.fetch(step_metrics)        those of several steps, on the host
    runner.evaluate(batches)          -> {"loss", "accuracy"} over the evaluation split
    runner.save()                     a checkpoint to resume from
    runner.export(name)               WORKDIR/NAME.msgpack and NAME.pth (`export_weights`)
    runner.close()

The loop (train/loop.py) knows nothing of either framework. Both start from the weights JAX
draws, so that a JAX run and a --framework torch run of the same flags differ only in the framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Protocol

import numpy as np

import mobilenet_arch

from train import metrics
from train.plan import Plan


class Runner(Protocol):
    step: int

    def train(self, batch: dict) -> dict: ...

    def fetch(self, step_metrics: list[dict]) -> list[dict]: ...

    def evaluate(self, batches: Iterable[dict]) -> dict: ...

    def save(self) -> None: ...

    def export(self, name: str) -> None: ...

    def close(self) -> None: ...


def create(config, run_plan: Plan, workdir: Path, described: Mapping) -> Runner:
    """The runner of `config.framework`, `described` (train/record.py) going into its exports."""
    from train import step as step_lib

    step_lib.use_compilation_cache()  # both runners compile the initial state in JAX
    runner_class = TorchRunner if config.framework == "torch" else JaxRunner
    return runner_class(config, run_plan, workdir, described)


class JaxRunner:
    """The Flax model's TrainState, replicated over every device of every host; batches sharded
    along their first axis (train/distributed.py); orbax checkpoints (train/checkpoint.py)."""

    def __init__(self, config, run_plan: Plan, workdir: Path, described: Mapping):
        import jax

        from train import checkpoint, distributed, step as step_lib

        self.run_plan, self.workdir, self.described = run_plan, workdir, described
        mesh = distributed.make_mesh()
        state_sharding, self.batch_sharding = distributed.replicated(mesh), distributed.batch_sharded(mesh)
        model = step_lib.model_for(config, run_plan.num_classes, run_plan.architecture, run_plan.frozen_blocks)
        init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
        pretrained = pretrained_variables(run_plan, init_key)
        # Initialised under jit straight into the replicated sharding (device_put of host values onto
        # a multi-process sharding is refused; jit replicates host values passed in).
        initial = jax.jit(lambda key, variables: _initial_state(config, run_plan, model, key, variables), out_shardings=state_sharding)
        self.manager = checkpoint.manager(workdir, config.keep_checkpoints)
        self.state = checkpoint.restore_latest(self.manager, initial(init_key, pretrained))
        self.step = int(jax.device_get(self.state.step))
        self._train, self._eval = step_lib.jit_steps(config.label_smoothing, state_sharding, self.batch_sharding)
        # Raw key data as numpy: jit replicates a host value on every process, where device_put of
        # a typed key onto a multi-process sharding is refused.
        self.dropout_key = np.asarray(jax.random.key_data(dropout_key))

    def train(self, batch: dict) -> dict:
        from train import distributed

        self.state, step_metrics = self._train(self.state, distributed.global_batch(batch, self.batch_sharding), self.dropout_key)
        self.step += 1
        return step_metrics

    def fetch(self, step_metrics: list[dict]) -> list[dict]:
        import jax

        return jax.device_get(step_metrics)

    def evaluate(self, batches: Iterable[dict]) -> dict:
        import jax

        from train import distributed

        totals = [self._eval(self.state, distributed.global_batch(b, self.batch_sharding)) for b in batches]
        return metrics.summarise(jax.device_get(totals))

    def save(self) -> None:
        from train import checkpoint

        checkpoint.save(self.manager, self.state)

    def export(self, name: str) -> None:
        import jax

        if jax.process_index() == 0:
            params, batch_stats, step = jax.device_get((self.state.params, self.state.batch_stats, self.state.step))
            variables = {"params": params, "batch_stats": batch_stats}
            export_weights(self.run_plan, self.workdir, name, variables, int(step), self.described)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _initial_state(config, run_plan: Plan, model, key, pretrained):
    import jax

    from flax_mobilenet import init_variables
    from train import optim, step as step_lib

    # The optimizer's labels need the parameter tree: shapes first, then build.
    params = jax.eval_shape(lambda: init_variables(model, key, run_plan.resolution))["params"]
    optimizer = optim.make_optimizer(config, params, run_plan.steps_per_epoch, run_plan.architecture, run_plan.frozen_blocks)
    if pretrained is None:
        return step_lib.create_train_state(model, optimizer, key, run_plan.resolution)
    return step_lib.TrainState.create(
        apply_fn=model.apply, params=pretrained["params"], batch_stats=pretrained["batch_stats"], tx=optimizer
    )


class TorchRunner:
    """torch_ref's model on a CUDA GPU when PyTorch sees one, else the CPU; the learning rate of
    JAX's schedule set at every step; one checkpoint file (train/torch_step.py)."""

    def __init__(self, config, run_plan: Plan, workdir: Path, described: Mapping):
        import jax
        import torch

        import parity
        from flax_mobilenet import init_variables
        from train import checkpoint, optim, step as step_lib, torch_step

        self.config, self.run_plan, self.workdir, self.described = config, run_plan, workdir, described
        # Start from the weights JAX would start from, so the two runs differ only in the framework.
        init_key, _ = jax.random.split(jax.random.key(config.seed))
        variables = pretrained_variables(run_plan, init_key)
        if variables is None:
            flax_model = step_lib.model_for(config, run_plan.num_classes, run_plan.architecture)
            variables = jax.device_get(init_variables(flax_model, init_key, run_plan.resolution))
        self.model = parity.load_torch(_checkpoint(run_plan, variables))
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        torch_step.freeze(self.model, run_plan.frozen_blocks)
        self.optimizer = torch_step.make_optimizer(config, self.model)
        self.path = checkpoint.torch_path(workdir)
        self.step = torch_step.restore_checkpoint(self.path, self.model, self.optimizer)
        self.learning_rates = optim.schedule_values(config, run_plan.steps_per_epoch)

    def train(self, batch: dict) -> dict:
        import torch

        from train import torch_step

        config = self.config
        torch_step.set_learning_rate(self.optimizer, float(self.learning_rates[self.step]))
        # Dropout masks from (seed, step), as JAX folds its dropout key: a resumed run draws the
        # masks an uninterrupted one would, which one seed at the start would not give.
        torch.manual_seed(step_seed(config.seed, self.step))
        self.step += 1
        return torch_step.train_step(
            self.model, self.optimizer, batch, config.label_smoothing, config.precision, clip_grad_norm=config.clip_grad_norm
        )

    def fetch(self, step_metrics: list[dict]) -> list[dict]:
        return [{name: value.item() for name, value in m.items()} for m in step_metrics]

    def evaluate(self, batches: Iterable[dict]) -> dict:
        from train import torch_step

        totals = [torch_step.eval_step(self.model, b, self.config.precision) for b in batches]
        return metrics.summarise(self.fetch(totals))

    def save(self) -> None:
        from train import torch_step

        torch_step.save_checkpoint(self.path, self.model, self.optimizer, self.step)

    def export(self, name: str) -> None:
        from parity import layouts
        from parity.layouts import to_flax

        state_dict = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        variables = to_flax(state_dict, layouts.torchvision.rules(self.run_plan.architecture))
        export_weights(self.run_plan, self.workdir, name, variables, self.step, self.described)

    def close(self) -> None:
        pass


def step_seed(seed: int, step: int) -> int:
    """A 64-bit seed for `step` of the run seeded `seed` (any Python int)."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), step]).generate_state(1, np.uint64)[0])


def pretrained_variables(run_plan: Plan, key) -> dict | None:
    """--init-from's variables for the model trained, or None without it: the checkpoint's, its
    head layers that `run_plan.new_head` names (train/plan.py: the output layer when the class
    count differs, all of them for --head's new head) initialised as the model initialises its
    dense layers (`classifier_init`, zero bias; drawn from `key`), and its head layers that the
    model no longer has dropped."""
    if run_plan.init is None:
        return None
    import flax.linen as nn
    import jax

    from flax_mobilenet.layers import classifier_init

    architecture = run_plan.architecture
    variables = jax.tree.map(np.asarray, run_plan.init.variables)
    params = variables["params"]
    for name in run_plan.init.architecture.head.flax_names:
        if name not in architecture.head.flax_names or name in run_plan.new_head:
            del params[name]
    shapes = dict(zip(architecture.head.flax_names, mobilenet_arch.dense_shapes(architecture)))
    for index, name in enumerate(run_plan.new_head):
        fan_in, units = shapes[name]
        layer = nn.Dense(units, kernel_init=classifier_init)
        params[name] = jax.device_get(layer.init(jax.random.fold_in(key, index), np.zeros((1, fan_in), np.float32))["params"])
    return variables


def _checkpoint(run_plan: Plan, variables: dict):
    """`variables` of the model trained as a parity.Checkpoint."""
    import jax

    import flax_mobilenet
    import parity

    # Writable copies: what jax.device_get returns is read-only, and torch.from_numpy warns on it.
    variables = jax.tree.map(np.array, variables)
    return parity.Checkpoint(
        flax_mobilenet.MobileNet(run_plan.architecture), variables, run_plan.architecture, run_plan.preprocessing, "flax", tuple(run_plan.class_names) or None
    )


def export_weights(run_plan: Plan, workdir: Path, name: str, variables: dict, step: int, described: Mapping) -> None:
    """WORKDIR/NAME.msgpack, its NAME.msgpack.json holding the architecture, the preprocessing and
    the run's record (`described`: train/record.py), and WORKDIR/NAME.pth (torchvision's layout),
    through parity."""
    import parity

    checkpoint = _checkpoint(run_plan, variables)
    parity.save(checkpoint, workdir / f"{name}.msgpack", extra=described)
    try:
        parity.save(checkpoint, workdir / f"{name}.pth", num_batches_tracked=step)
    except parity.LayoutError as e:  # a padding or epsilon torchvision's models cannot express
        print(f"{workdir / name}.pth not written: {e}", flush=True)
