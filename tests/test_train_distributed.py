"""Data parallelism: 8 simulated devices, and 2 processes joined by `jax.distributed` on localhost,
train like one device from the same seed (BatchNorm statistics over the global batch included)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The helpers of test_train_main (one compile cache per session, subprocess runs).
_spec = importlib.util.spec_from_file_location("train_main_tests", Path(__file__).with_name("test_train_main.py"))
_main_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main_tests)
ROOT, TINY, environment, run, train_losses, load_params, shared_run = (
    _main_tests.ROOT, _main_tests.TINY, _main_tests.environment, _main_tests.run, _main_tests.train_losses,
    _main_tests.load_params, _main_tests.shared_run,
)
compile_cache = _main_tests.compile_cache

# One step, and its checkpoint (written by every process).
FLAGS = [*TINY, "--max-steps", "1", "--checkpoint-every", "1"]
# Splitting the batch changes the order of the float32 sums in the loss, in BatchNorm's means and
# variances and in the gradients (~1e-7 relative). The first step's loss is the forward pass alone
# on the same parameters: it agrees to ~1e-7, so 1e-4; a wrong split (another batch, per-device
# BatchNorm statistics) is off by 1e-2 or more.
LOSS_RTOL = 1e-4
# The update (parameters after the step minus the initial ones) also passes through the backward,
# where this network is chaotic (measured, and the mechanism, above test_train_optim's lockstep
# test): the forward differences grow to ~2e-5 by the last blocks, whose maps are 2x2 and 1x1,
# and where a ReLU6 input lies that close to a kink, that unit's gradient flips between runs and
# moves every earlier gradient. Measured, relative L2 of the update's difference from one
# device's: 1.2e-5 without a flip, 2.6e-2 with one (one unit of 8,192 at the 22nd BatchNorm, with
# the native BatchNorm reductions; XLA's, summed in another order, happen not to flip it). After a
# second step the flips compound (8e-2 to 7e-1), so one step is compared. A gradient summed over
# the 8 devices instead of averaged is 8x the update (off by 7); 0.1.
UPDATE_RTOL = 0.1


@pytest.fixture(scope="session")
def one_device(tmp_path_factory, compile_cache) -> Path:
    return shared_run(tmp_path_factory, compile_cache, "two-step-run", FLAGS)


def _initial_params() -> dict:
    """The parameters train.main starts TINY from (its seed's first key, as train.main splits it)."""
    import jax

    from flax_mobilenet import init_variables
    from train import config as config_lib, step as step_lib

    config = config_lib.parse_config(TINY)
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    return init_variables(step_lib.model_for(config, 10), init_key, 32)["params"]


def _flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _assert_trains_like_one_device(workdir: Path, one_device: Path, record_property) -> None:
    np.testing.assert_allclose(train_losses(workdir)[0], train_losses(one_device)[0], rtol=LOSS_RTOL)
    start = _flat(_initial_params())
    want = _flat(load_params(one_device)["params"]) - start
    got = _flat(load_params(workdir)["params"]) - start
    assert np.linalg.norm(want) > 1e-3 * np.linalg.norm(start)  # the runs did move the parameters
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    record_property("update_rel_l2_vs_one_device", float(error))
    assert error < UPDATE_RTOL


def test_eight_devices_train_like_one(one_device, tmp_path, compile_cache, record_property):
    run(["-m", "train.main", *FLAGS, "--workdir", str(tmp_path)], compile_cache, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    _assert_trains_like_one_device(tmp_path, one_device, record_property)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(one_device, tmp_path, compile_cache, record_property):
    address = f"localhost:{_free_port()}"
    args = ["-m", "train.main", *FLAGS, "--workdir", str(tmp_path)]
    processes = [
        subprocess.Popen(
            [sys.executable, *args, "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)],
            cwd=ROOT, env=environment(compile_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    _assert_trains_like_one_device(tmp_path, one_device, record_property)
