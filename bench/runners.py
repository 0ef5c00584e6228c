"""One framework's model, optimizer state and batch, ready to time: `train()` and `infer()` each run
one step of the functions training itself uses and wait for its result.

Frameworks: `jax` (the depthwise implementation `flax_mobilenet.depthwise` picks for the backend),
`jax-xla-dw` and `jax-shifted-dw` (the same with FLAX_MOBILENET_DEPTHWISE=xla or shifted while
tracing: XLA's grouped convolution, or the pure-JAX shifted form; beside `jax` they show what the
native kernels bring), `torch` (eager, NCHW memory as a DataLoader hands it over),
`torch-channels-last` (eager with the model and batch in channels-last memory, which PyTorch
recommends for convolutions on the CPU: up to twice as fast in training here), `torch-compile` (`torch.compile(model)`; the optimizer
stays eager) and `keras` (Keras 3 on its JAX backend, the nearest JAX peer: `keras.applications`'
MobileNet or MobileNetV2 with `weights=None`, compiled with `jit_compile=True`, `train_on_batch`
and `predict_on_batch` on the same batch as numpy arrays).

The steps are `train.step.jit_steps` (jitted `train_step`, `eval_step`) and
`train.torch_step.train_step` / `eval_step`, on the default recipe of `train.config` (SGD with
momentum, weight decay, label smoothing 0.1), ImageNet's 1000 classes, width 1.0. JAX gets
its batch already on the device (as a prefetching input pipeline gives it); torch's step converts
the NHWC numpy batch itself, as in training. Keras gets the same recipe's SGD (its weight decay is
decoupled, as Keras has it) and cross-entropy with label smoothing, from logits; its models are
Keras's own (V1's dropout 0.001, no dropout in V2, its padding), so its row is the same work, not
the same numbers.

Precision `bf16` computes in bfloat16 with float32 parameters in both frameworks: the Flax models
with `dtype=bfloat16` (as `train.main --precision bf16`), PyTorch under `torch.autocast(bfloat16)`
(AMP) with the model and its input in channels-last memory. On a GPU PyTorch runs on it (the model
and each batch moved there, the batch's copy timed).

Compile time: JAX's trace, lower and compile (AOT); torch.compile's first training step minus an
eager step. JAX's runner also keeps XLA's own memory count for the compiled training step.

JAX, PyTorch and Keras are imported inside the runners, never at the top: the command line sets up
malloc (`toolkit.allocator`) before any starts its threads, and Keras reads its backend at import.
"""

from __future__ import annotations

import time

import numpy as np

FRAMEWORKS = ("jax", "jax-xla-dw", "jax-shifted-dw", "torch", "torch-channels-last", "torch-compile", "keras")
DEFAULT_FRAMEWORKS = ("jax", "torch", "torch-channels-last", "torch-compile")
NUM_CLASSES = 1000


def _depthwise_impl(name: str | None):
    # The depthwise implementation is read at trace time, so it only needs to hold while tracing.
    from flax_mobilenet import backend

    return backend.chosen({backend.DEPTHWISE_ENV: name})


def _config(arch: str, resolution: int, batch: int, precision: str = "fp32"):
    from train.config import Config

    return Config(arch=arch, width=1.0, resolution=resolution, batch_size=batch, precision=precision)


def random_batch(batch: int, resolution: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, resolution, resolution, 3), dtype=np.float32)
    return {"image": image, "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}



def first_call_overhead(step) -> float:
    """Seconds the first call of `step` takes beyond the second: what compiling it cost."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    return first - (time.perf_counter() - start)


class JaxRunner:
    def __init__(self, arch: str, resolution: int, batch: int, depthwise: str | None = None, precision: str = "fp32"):
        import jax

        from flax_mobilenet import init_variables
        from flax_mobilenet.depthwise import implementation
        from train import optim
        from train import step as step_lib

        config = _config(arch, resolution, batch, precision)
        model = step_lib.model_for(config, NUM_CLASSES)
        key = jax.random.key(0)
        params = init_variables(model, key, resolution)["params"]
        optimizer = optim.make_optimizer(config, params, steps_per_epoch=1000)
        self.state = step_lib.create_train_state(model, optimizer, key, resolution)
        self.batch = jax.device_put(random_batch(batch, resolution))
        self.key = jax.random.key(1)
        train_fn, eval_fn = step_lib.jit_steps(config.label_smoothing)
        with _depthwise_impl(depthwise):
            self.depthwise = implementation()
            start = time.perf_counter()
            self._train = train_fn.lower(self.state, self.batch, self.key).compile()
            self.compile_s = time.perf_counter() - start
            self._eval = eval_fn.lower(self.state, self.batch).compile()
        memory = self._train.memory_analysis()
        self.xla_bytes = None
        if memory is not None:
            self.xla_bytes = (
                memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes
            )

    def train(self) -> None:
        import jax

        self.state, metrics = self._train(self.state, self.batch, self.key)
        jax.block_until_ready(metrics)

    def infer(self) -> None:
        import jax

        jax.block_until_ready(self._eval(self.state, self.batch))


class TorchRunner:
    def __init__(self, arch: str, resolution: int, batch: int, compile: bool = False, precision: str = "fp32", channels_last: bool = False):
        import torch

        import torch_ref
        from train import torch_step

        self.config = _config(arch, resolution, batch, precision)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # AMP's usual company: channels-last memory, which cuDNN and oneDNN prefer for bf16.
        self.memory_format = torch.channels_last if precision == "bf16" or channels_last else torch.contiguous_format
        torch.manual_seed(0)
        model = torch_ref.create_model(arch, 1.0, NUM_CLASSES).to(self.device, memory_format=self.memory_format)
        self.optimizer = torch_step.make_optimizer(self.config, model)
        torch_step.set_learning_rate(self.optimizer, self.config.lr)
        self.model = torch.compile(model) if compile else model
        self.batch = random_batch(batch, resolution)
        self.compile_s = None
        if compile:
            # Compilation happens on the first call of each mode; an eager step is subtracted.
            self.compile_s = first_call_overhead(self.train)
        self.xla_bytes = None

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def train(self) -> None:
        from train import torch_step

        torch_step.train_step(
            self.model, self.optimizer, self.batch, self.config.label_smoothing, self.config.precision, self.memory_format
        )
        self._sync()

    def infer(self) -> None:
        from train import torch_step

        torch_step.eval_step(self.model, self.batch, self.config.precision, self.memory_format)
        self._sync()


def keras_module():
    import os

    # Keras picks its backend once, at its first import, from this variable (TensorFlow if unset).
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras runs on {keras.backend.backend()!r}: set KERAS_BACKEND=jax before keras is imported")
    return keras


class KerasRunner:
    def __init__(self, arch: str, resolution: int, batch: int, precision: str = "fp32"):
        keras = keras_module()

        config = _config(arch, resolution, batch, precision)
        build = keras.applications.MobileNet if arch == "v1" else keras.applications.MobileNetV2
        keras.utils.set_random_seed(0)
        policy = keras.config.dtype_policy()
        # bf16 as Keras has it: the global policy while the layers are built, float32 variables.
        keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bf16" else "float32")
        try:
            model = build(input_shape=(resolution, resolution, 3), weights=None, classes=NUM_CLASSES, classifier_activation=None)
        finally:
            keras.config.set_dtype_policy(policy)
        optimizer = keras.optimizers.SGD(
            config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay or None
        )
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
        model.compile(optimizer=optimizer, loss=loss, jit_compile=True)
        data = random_batch(batch, resolution)
        self.images = data["image"]
        self.labels = np.eye(NUM_CLASSES, dtype=np.float32)[data["label"]]
        self.model = model
        self.xla_bytes = None
        # Keras compiles on the first call of each; a compiled step is subtracted.
        self.compile_s = first_call_overhead(self.train)

    def train(self) -> None:
        self.model.train_on_batch(self.images, self.labels)  # returns the loss as numpy: waits

    def infer(self) -> None:
        self.model.predict_on_batch(self.images)


def make_runner(framework: str, arch: str, resolution: int, batch: int, precision: str = "fp32"):
    if framework == "jax":
        return JaxRunner(arch, resolution, batch, precision=precision)
    if framework in ("jax-xla-dw", "jax-shifted-dw"):
        return JaxRunner(arch, resolution, batch, depthwise=framework.split("-")[1], precision=precision)
    if framework == "torch":
        return TorchRunner(arch, resolution, batch, precision=precision)
    if framework == "torch-channels-last":
        return TorchRunner(arch, resolution, batch, precision=precision, channels_last=True)
    if framework == "torch-compile":
        return TorchRunner(arch, resolution, batch, compile=True, precision=precision)
    if framework == "keras":
        return KerasRunner(arch, resolution, batch, precision=precision)
    raise ValueError(f"unknown framework {framework!r}: expected one of {', '.join(FRAMEWORKS)}")
