"""A training and an inference step as a user writes them from the README alone, timed against the
same steps in PyTorch: no tool of this project's, no environment set-up, nothing imported first
on purpose. `python -m bench.plain` runs it in fresh processes; run alone it prints one JSON line.

    python examples/plain_script.py --arch v2 --resolution 224 --batch 16 --repeats 5
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch  # first, as many scripts have it: the set-up must not depend on import order
import jax
import jax.numpy as jnp
import optax

import flax_mobilenet
import torch_ref

parser = argparse.ArgumentParser()
parser.add_argument("--arch", default="v2")
parser.add_argument("--resolution", type=int, default=224)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--steps", type=int, default=3, help="steps per timing")
parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile(model)")
args = parser.parse_args()

rng = np.random.default_rng(0)
images = rng.standard_normal((args.batch, args.resolution, args.resolution, 3), dtype=np.float32)
labels = rng.integers(0, 1000, args.batch)

# ---- JAX, from the README's API
model = flax_mobilenet.MobileNetV1() if args.arch == "v1" else flax_mobilenet.MobileNetV2()
variables = flax_mobilenet.init_variables(model, jax.random.key(0), resolution=args.resolution)
tx = optax.sgd(0.05, momentum=0.9)
state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))


@jax.jit
def train_step(state, images, labels, dropout_key):
    params, batch_stats, opt_state = state

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            rngs={"dropout": dropout_key}, mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, param_updates), updates["batch_stats"], opt_state), loss


@jax.jit
def predict(params, batch_stats, images):
    return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)


x, y, key = jnp.asarray(images), jnp.asarray(labels), jax.random.key(1)


def jax_train():
    global state
    state, loss = train_step(state, x, y, key)
    loss.block_until_ready()


def jax_infer():
    predict(state[0], state[1], x).block_until_ready()


# ---- PyTorch, eager (and compiled): the same steps on NCHW tensors, as a DataLoader hands them
# over; and eager in channels-last memory, which PyTorch recommends for CPU convolutions.
def torch_setup(channels_last=False):
    torch.manual_seed(0)
    net = torch_ref.MobileNetV1() if args.arch == "v1" else torch_ref.MobileNetV2()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    inputs = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=memory_format)
    return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), inputs


def torch_steps(net, optimizer, inputs):
    targets = torch.from_numpy(labels)

    def train():
        net.train()
        loss = torch.nn.functional.cross_entropy(net(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer():
        net.eval()
        with torch.no_grad():
            net(inputs)

    return train, infer


runs = {"jax": (jax_train, jax_infer), "torch": torch_steps(*torch_setup())}
runs["torch-channels-last"] = torch_steps(*torch_setup(channels_last=True))
if args.torch_compile:
    net, optimizer, inputs = torch_setup()
    runs["torch-compile"] = torch_steps(torch.compile(net), optimizer, inputs)

for train, infer in runs.values():  # compile and warm up
    train(), train(), infer(), infer()

seconds = {(name, kind): [] for name in runs for kind in ("train", "infer")}
names = list(runs)
for repeat in range(args.repeats):
    for name in names[repeat % len(names):] + names[: repeat % len(names)]:
        for kind, fn in zip(("train", "infer"), runs[name]):
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            seconds[name, kind].append((time.perf_counter() - start) / args.steps)

result = {f"{name}_{kind}_img_s": args.batch / statistics.median(s) for (name, kind), s in seconds.items()}
print(json.dumps({"arch": args.arch, "resolution": args.resolution, "batch": args.batch, **result}))
