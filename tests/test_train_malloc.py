"""toolkit.allocator: a large buffer freed by a worker thread stays mapped, so the next step's buffer of
the same size costs no page faults. Each case runs in a fresh process (malloc's set-up is
per process and has to come before other threads allocate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUFFER = 256 << 20
PAGES = BUFFER // 4096

# A worker thread that lives across steps (as XLA:CPU's pool does) allocates one large buffer per
# step, writes every byte and frees it; the minor page faults of the last two steps are reported.
PROBE = f"""
import ctypes, json, resource, sys
from concurrent.futures import ThreadPoolExecutor
from toolkit import allocator as malloc
applied = malloc.keep_step_buffers() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def step():
    buffer = libc.malloc({BUFFER})
    ctypes.memset(buffer, 1, {BUFFER})
    libc.free(buffer)

with ThreadPoolExecutor(1) as pool:
    pool.submit(step).result()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pool.submit(step).result()
    pool.submit(step).result()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"applied": applied, "faults_per_step": faults / 2}}))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc only"
)


def _probe(mode: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, env=os.environ | env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@linux_glibc
def test_a_freed_step_buffer_is_reused_without_page_faults():
    result = _probe("tune")
    assert result["applied"]
    # Writing the same 65,536 pages again after the set-up: only pages the heap had to grow by
    # may fault (none, once the first step has grown it); 1% leaves room for malloc's bookkeeping.
    assert result["faults_per_step"] < PAGES / 100, result


@linux_glibc
def test_without_it_every_page_of_the_buffer_faults_again():
    # The control that shows the probe measures what the set-up changes. Transparent huge pages
    # set to "always" would map 2 MiB at a fault and hide the difference.
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages are 'always' here: faults come 512 pages at a time")
    result = _probe("default")
    assert result["faults_per_step"] > PAGES / 2, result


def test_opting_out_leaves_malloc_alone():
    assert _probe("tune", FLAX_MOBILENET_MALLOC="default")["applied"] is False


def test_applied_after_jax_and_torch_are_imported():
    # JAX's threads start with its first computation, not at import, so the set-up still holds.
    code = "import jax, torch; from toolkit import allocator; print(allocator.keep_step_buffers())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# A user's own training step, written from the README's API alone and nothing else: `import
# flax_mobilenet` after jax is what sets malloc up. Prints the minor page faults of each of five
# steps and, on stderr, glibc's malloc_stats (one "Arena N:" line per arena).
PLAIN_SCRIPT = """
import ctypes, json, resource
import jax, jax.numpy as jnp, optax
import flax_mobilenet

model = flax_mobilenet.MobileNetV2(width_mult=0.5, num_classes=10)
variables = flax_mobilenet.init_variables(model, jax.random.key(0), resolution=32)
tx = optax.sgd(0.1, momentum=0.9)

@jax.jit
def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                      rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    steps, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, steps), updates["batch_stats"], opt_state, loss

state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
images, labels = jnp.ones((64, 32, 32, 3)), jnp.arange(64) % 10
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    *state, loss = train_step(*state, images, labels)
    loss.block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
ctypes.CDLL(None).malloc_stats()
print(json.dumps(faults))
"""


def _plain_script(malloc_env: str) -> tuple[list[int], int]:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_SCRIPT], cwd=ROOT, env=os.environ | {"FLAX_MOBILENET_MALLOC": malloc_env},
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout), out.stderr.count("Arena ")


@linux_glibc
def test_importing_flax_mobilenet_keeps_a_plain_scripts_step_buffers():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages are 'always' here: faults come 512 pages at a time")
    tuned, tuned_arenas = _plain_script("import")
    control, control_arenas = _plain_script("default")
    # The mechanism: every thread allocates from the one (main) arena; without it XLA's worker
    # threads each get their own.
    assert tuned_arenas == 1 and control_arenas > 1, (tuned_arenas, control_arenas)
    # Its effect, in the same script: after two steps (compilation, the heap's growth) the step's
    # buffers come back from the heap without faulting (0-2 a step measured), while without it they
    # fault again each step (9,400-10,900 measured). A tenth of the control's median leaves room for
    # a few pages of growth and still fails if the buffers were unmapped between steps.
    tuned_per_step, control_per_step = sorted(tuned[2:])[1], sorted(control[2:])[1]
    assert tuned_per_step < control_per_step / 10, (tuned, control)
