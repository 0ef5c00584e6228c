"""`python -m train.main` end to end, in subprocesses, on tiny runs: metrics, checkpoints and resume,
the NaN stop, exported weights, train.eval, and the flag errors.

Every run shares one persistent XLA compilation cache, so that the same tiny network is compiled
once per device layout rather than once per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import serialization

ROOT = Path(__file__).resolve().parents[1]
# MobileNetV1 at width 0.25 on 32x32 digits: the cheapest network to compile; 16 a batch.
TINY = "--arch v1 --width 0.25 --batch-size 16 --epochs 1 --lr 0.01 --warmup-epochs 0 --log-every 1 --no-progress".split()


def session_dir(tmp_path_factory) -> Path:
    """A directory shared by every test of this pytest session, pytest-xdist workers included."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextlib.contextmanager
def locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return session_dir(tmp_path_factory) / "jax-compile-cache"


def environment(cache: Path, extra: dict | None = None) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **(extra or {}),
    }


def run(args, cache: Path, *, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=environment(cache, env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def train_losses(workdir: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def load_params(workdir: Path) -> dict:
    return serialization.msgpack_restore((workdir / "model.msgpack").read_bytes())


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, compile_cache) -> Path:
    """Eight steps on one device, checkpointing every two; run once per session (it is the
    reference of this file's and test_train_distributed's comparisons)."""
    workdir = session_dir(tmp_path_factory) / "baseline-run"
    with locked(workdir.with_suffix(".lock")):
        if not (workdir / "model.msgpack").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            args = [*TINY, "--max-steps", "8", "--checkpoint-every", "2", "--workdir", str(workdir)]
            run(["-m", "train.main", *args], compile_cache)
    return workdir


def test_metrics_jsonl_has_train_rows_every_log_step_and_an_eval_row(baseline):
    rows = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [sorted(r) for r in train] == [["step", "train_loss"]] * 8
    assert [r["step"] for r in train] == list(range(1, 9))  # --log-every 1
    assert len(evals) == 1 and sorted(evals[0]) == ["epoch", "eval_accuracy", "eval_loss", "step"]
    assert evals[0]["step"] == 8 and evals[0]["epoch"] == 1 and 0 <= evals[0]["eval_accuracy"] <= 1
    assert (baseline / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_and_resumed_run_ends_with_the_same_parameters(baseline, tmp_path, compile_cache):
    args = ["-m", "train.main", *TINY, "--max-steps", "8", "--checkpoint-every", "2", "--workdir", str(tmp_path)]
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=environment(compile_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoints" / "4").is_dir():  # orbax renames a checkpoint into place when complete
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "model.msgpack").exists()  # it really was killed midway
    run(args, compile_cache)
    resumed, uninterrupted = load_params(tmp_path), load_params(baseline)
    # Same program, same data (a function of seed and epoch), dropout keys folded per step: bit-exact.
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)
    assert train_losses(tmp_path) == train_losses(baseline)  # each step logged once, with the same loss


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, compile_cache):
    args = TINY + ["--lr", "1e30", "--max-steps", "8", "--checkpoint-every", "1", "--workdir", str(tmp_path)]
    result = run(["-m", "train.main", *args], compile_cache, check=False)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "at step" in message and ("nan" in message or "inf" in message), message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and kept[-1] < bad_step
    assert f"step {kept[-1]}" in message
    assert not (tmp_path / "model.msgpack").exists()


@pytest.fixture(scope="session")
def v2_run(tmp_path_factory, compile_cache) -> Path:
    """MobileNetV2 for two steps: what model.pth and train.eval are checked on."""
    workdir = tmp_path_factory.mktemp("v2")
    args = "--arch v2 --width 0.35 --batch-size 16 --epochs 1 --max-steps 2 --no-progress".split()
    run(["-m", "train.main", *args, "--workdir", str(workdir)], compile_cache)
    return workdir


def test_model_pth_loads_strictly_into_torchvision_mobilenet_v2(v2_run):
    state_dict = torch.load(v2_run / "model.pth", map_location="cpu", weights_only=True)
    model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)
    model.load_state_dict(state_dict, strict=True)
    assert int(state_dict["features.0.1.num_batches_tracked"]) == 2  # the steps trained


def test_eval_gives_the_same_accuracy_in_both_frameworks_from_either_file(v2_run, compile_cache):
    accuracies = set()
    for framework in ("jax", "torch"):
        for weights in ("model.msgpack", "model.pth"):
            args = ["-m", "train.eval", "--arch", "v2", "--width", "0.35", "--weights", str(v2_run / weights), "--framework", framework]
            last = run(args, compile_cache).stdout.strip().splitlines()[-1]
            assert last.startswith("accuracy=")
            accuracies.add(last)
    # 360 test images: one differing prediction would change the accuracy by 0.0028. The logits of
    # the two frameworks agree to ~1e-5, far inside any margin between classes here.
    assert len(accuracies) == 1, accuracies


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--arch", "v3"], "invalid choice: 'v3'"),
        (["--dataset", "no_such_dataset_xyz"], "no_such_dataset_xyz"),
        (["--resolution", "16"], "at least 32"),
        (["--batch-size", "12"], "multiple of 8"),
    ],
    ids=["unknown-arch", "unknown-dataset", "resolution-too-small", "batch-not-divisible"],
)
def test_bad_flags_fail_with_one_line_before_any_work(flags, expected, tmp_path, compile_cache):
    workdir = tmp_path / "run"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = run(["-m", "train.main", *flags, "--workdir", str(workdir)], compile_cache, env=env, check=False, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and expected in lines[0], result.stderr
    assert not workdir.exists()
