"""`python -m train.main` end to end, in subprocesses, on tiny runs: metrics, checkpoints and resume
(both frameworks), the NaN stop, exported weights, train.eval, and the flag errors.

Every run shares one persistent XLA compilation cache, so that the same tiny network is compiled
once per device layout rather than once per process.
"""

from __future__ import annotations

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
from PIL import Image

import parity
from mobilenet_arch import mobilenet_v1
from tests.shared import locked, session_dir
from tests.cli_errors import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
# MobileNetV1 at width 0.25 on 32x32 digits: the cheapest network to compile; 16 a batch.
TINY = "--arch v1 --width 0.25 --batch-size 16 --epochs 1 --lr 0.01 --warmup-epochs 0 --log-every 1 --no-progress".split()
# The PyTorch path, with dropout so that resuming it must also restore the dropout masks.
TORCH = "--framework torch --dropout 0.2".split()


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


def load_state_dict(workdir: Path) -> dict:
    return torch.load(workdir / "model.pth", map_location="cpu", weights_only=True)


def shared_run(tmp_path_factory, compile_cache, name: str, flags: list[str]) -> Path:
    """`python -m train.main FLAGS` in a workdir shared by the whole session: run by the first
    test (of any pytest-xdist worker) that needs it, reused by the others."""
    workdir = session_dir(tmp_path_factory) / name
    with locked(workdir.with_suffix(".lock")):
        if not (workdir / "model.msgpack").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            run(["-m", "train.main", *flags, "--workdir", str(workdir)], compile_cache)
    return workdir


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, compile_cache) -> Path:
    """Eight steps on one device, checkpointing every two: the reference of this file's and
    test_train_end_to_end's comparisons."""
    return shared_run(tmp_path_factory, compile_cache, "baseline-run", [*TINY, "--max-steps", "8", "--checkpoint-every", "2"])


@pytest.fixture(scope="session")
def torch_baseline(tmp_path_factory, compile_cache) -> Path:
    """The same eight steps in PyTorch (with dropout), uninterrupted."""
    flags = [*TINY, *TORCH, "--max-steps", "8", "--checkpoint-every", "2"]
    return shared_run(tmp_path_factory, compile_cache, "torch-baseline-run", flags)


def test_metrics_jsonl_has_train_rows_every_log_step_and_an_eval_row(baseline):
    rows = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [sorted(r) for r in train] == [["step", "train_loss"]] * 8
    assert [r["step"] for r in train] == list(range(1, 9))  # --log-every 1
    assert len(evals) == 1 and sorted(evals[0]) == ["epoch", "eval_accuracy", "eval_loss", "step"]
    assert evals[0]["step"] == 8 and evals[0]["epoch"] == 1 and 0 <= evals[0]["eval_accuracy"] <= 1
    assert (baseline / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FakeRunner:
    """A runner (train/runners.py) whose step, evaluation, checkpoint and export do nothing."""

    step = 0

    def train(self, batch):
        self.step += 1
        return {"loss": np.float32(1.0), "accuracy": np.float32(0.5)}

    def fetch(self, step_metrics):
        return step_metrics

    def evaluate(self, batches):
        return {"loss": 1.0, "accuracy": 0.5}

    def save(self):
        pass

    def export(self, name):
        pass


def _fake_loop(monkeypatch, tmp_path, epochs: int) -> list[int]:
    """train.loop's loop over `epochs` epochs of 2 steps with a fake runner; returns the steps at
    which curves.png was drawn."""
    from train import config as config_lib
    from train import loop, metrics, plan

    drawn = []
    monkeypatch.setattr(metrics, "plot_workdir", lambda workdir: drawn.append(len(metrics.read(workdir))))
    monkeypatch.setattr(loop, "_train_batches", lambda config, run_plan, epoch, first: iter([{}] * (2 - first)))
    monkeypatch.setattr(loop, "_eval_batches", lambda config, run_plan: iter([]))
    config = config_lib.parse_config(["--epochs", str(epochs), "--log-every", "1", "--no-progress", "--workdir", str(tmp_path)])
    run_plan = plan.Plan(10, 32, steps_per_epoch=2, total_steps=2 * epochs, stop_step=2 * epochs, checkpoint_every=2)
    loop.run(config, run_plan, tmp_path, FakeRunner())
    return drawn


def test_curves_are_drawn_after_the_first_evaluation_and_at_the_end_when_epochs_are_quick(monkeypatch, tmp_path):
    # Five epochs of a fake step take milliseconds, far under PLOT_INTERVAL_SECONDS: the first
    # evaluation draws (3 rows: two train losses and the evaluation), and the end draws all 15.
    assert _fake_loop(monkeypatch, tmp_path, epochs=5) == [3, 15]


def test_curves_are_drawn_after_every_evaluation_once_the_interval_has_passed(monkeypatch, tmp_path):
    from train import loop

    monkeypatch.setattr(loop, "PLOT_INTERVAL_SECONDS", 0.0)
    # Every evaluation draws; the last one has drawn every row, so the end does not draw again.
    assert _fake_loop(monkeypatch, tmp_path, epochs=3) == [3, 6, 9]


@pytest.mark.parametrize("configured", [None, "elsewhere"])
def test_runs_keep_compiled_programs_beside_the_kernels_unless_a_cache_is_configured(configured, monkeypatch, tmp_path):
    from flax_mobilenet import native
    from train import step as step_lib

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", configured and str(tmp_path / configured))
        step_lib.use_compilation_cache()
        # Unconfigured: a folder beside the kernels ($FLAX_MOBILENET_CACHE), one per build of them.
        expected = tmp_path / configured if configured else step_lib.programs_dir()
        assert jax.config.jax_compilation_cache_dir == str(expected)
        assert configured or step_lib.programs_dir().parent == tmp_path / "xla"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


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


# Runs train.main and kills itself with SIGKILL as step $KILL_DURING_STEP begins, the way a
# preempted job dies. The JAX test above kills from outside once a checkpoint appears; the PyTorch
# path's tiny steps take milliseconds, so such a kill would often land after the run had ended.
KILL_DURING_STEP = """
import os, signal, sys
from train import main, torch_step
train_step, calls = torch_step.train_step, []
def train_step_or_die(*args, **kwargs):
    calls.append(None)
    if len(calls) == int(os.environ["KILL_DURING_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(*args, **kwargs)
torch_step.train_step = train_step_or_die
sys.exit(main.main(sys.argv[1:]))
"""


def test_killed_and_resumed_torch_run_ends_with_the_same_parameters(torch_baseline, tmp_path, compile_cache):
    flags = [*TINY, *TORCH, "--max-steps", "8", "--checkpoint-every", "2", "--workdir", str(tmp_path)]
    killed = run(["-c", KILL_DURING_STEP, *flags], compile_cache, env={"KILL_DURING_STEP": "6"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert saved["step"] == 4 and len(train_losses(tmp_path)) == 5  # step 5 was logged past the checkpoint
    assert not (tmp_path / "model.pth").exists()
    run(["-m", "train.main", *flags], compile_cache)
    resumed, uninterrupted = load_state_dict(tmp_path), load_state_dict(torch_baseline)
    assert resumed.keys() == uninterrupted.keys()
    # Same batches and learning rates, momentum restored, dropout masks seeded by step: bit-exact.
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    assert train_losses(tmp_path) == train_losses(torch_baseline)  # step 5 logged once, steps 5-8 redone


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
        (["--batch-size", "12"], "multiple of 8"),
        (["--dataset", "cifar10", "--data-dir", "{tmp_path}"], "tfds build cifar10 --file_format=array_record"),
    ],
    ids=["batch-not-divisible", "dataset-not-prepared"],
)
def test_bad_set_up_fails_with_one_line_before_any_work(flags, expected, tmp_path, compile_cache):
    # What only the devices or the data on disk can tell; the flags alone are checked below.
    workdir = tmp_path / "run"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    flags = [f.format(tmp_path=tmp_path) for f in flags]
    result = run(["-m", "train.main", *flags, "--workdir", str(workdir)], compile_cache, env=env, check=False, timeout=120)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, expected)
    assert not workdir.exists()


@pytest.mark.parametrize("flags", [[*TINY, *TORCH], [*TINY, "--arch", "v2"], [*TINY, "--resolution", "64"]], ids=["framework", "arch", "resolution"])
def test_a_workdir_holding_another_run_is_refused_before_anything_is_written(flags, baseline, tmp_path, compile_cache):
    # Another framework would start over and overwrite the run's metrics; another model would
    # restore its checkpoint into the wrong shapes.
    for name in ("run.json", "metrics.jsonl"):
        shutil.copy(baseline / name, tmp_path / name)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    result = run(["-m", "train.main", *flags, "--workdir", str(tmp_path)], compile_cache, check=False, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "holds another run" in last and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "run.json"]


# Runs `python -m MODULE ARGS...` (MODULE and ARGS from the command line) and prints, when it
# exits, which frameworks it had imported.
FRAMEWORKS_IMPORTED = """
import runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print(" ".join(name for name in ("jax", "torch", "flax", "grain") if name in sys.modules))
"""


@pytest.mark.parametrize(
    "module, flags, expected",
    [
        ("train.main", ["--arch", "v3"], "invalid choice: 'v3'"),
        ("train.main", ["--dataset", "no_such_dataset_xyz"], "unknown --dataset 'no_such_dataset_xyz'"),
        ("train.main", ["--resolution", "16"], "at least 32"),
        ("train.main", ["--lr", "-1"], "expected a number > 0"),
        ("train.main", ["--dropout", "1.5"], "expected a value in [0, 1)"),
        ("train.eval", ["--arch", "v1", "--weights", "no_such_file.pth"], "no_such_file.pth: no such file"),
        ("train.eval", ["--arch", "v1", "--weights", "README.md", "--resolution", "16"], "at least 32"),
        ("train.eval", ["--arch", "v1", "--weights", "README.md", "--dataset", "no_such_dataset_xyz"], "no_such_dataset_xyz"),
        ("train.compare", ["no_such_workdir"], "no_such_workdir: no such directory"),
    ],
    ids=[
        "main-unknown-arch", "main-unknown-dataset", "main-resolution-too-small", "main-negative-lr", "main-dropout-over-1",
        "eval-missing-weights", "eval-resolution-too-small", "eval-unknown-dataset", "compare-missing-workdir",
    ],
)
def test_bad_flags_fail_with_one_line_before_jax_or_torch_is_imported(module, flags, expected, tmp_path, compile_cache):
    workdir = tmp_path / "run"
    flags = [*flags, "--workdir", str(workdir)] if module == "train.main" else flags
    result = run(["-c", FRAMEWORKS_IMPORTED, module, *flags], compile_cache, check=False, timeout=120)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, expected)
    assert result.stdout.strip() == ""  # none of jax, torch, flax or grain (which imports jax)
    assert not workdir.exists()


def test_a_width_outside_the_published_list_trains_and_exports_both_files(tmp_path, compile_cache):
    # Width 0.3 is no published width: its channels (8, 16, 40, ...) are read from the shapes when
    # exporting, never matched against a list, so both files are written and load back.
    flags = ["--arch", "v1", "--width", "0.3", *TINY[4:], "--max-steps", "2", "--workdir", str(tmp_path)]
    run(["-m", "train.main", *flags], compile_cache)
    loaded = parity.load(tmp_path / "model.pth")
    # The width is a label: 0.2969 and 0.3 give the same channels, and the channels are what count.
    channels = [layer.out_channels for block in loaded.architecture.blocks for layer in block.layers]
    assert channels == [layer.out_channels for block in mobilenet_v1(0.3).blocks for layer in block.layers]
    flax_tree = load_params(tmp_path)
    assert np.array_equal(loaded.variables["params"]["features_0"]["stem"]["conv"]["kernel"], flax_tree["params"]["features_0"]["stem"]["conv"]["kernel"])


def write_one_class_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        (root / split / "only").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / split / "only" / f"{i}.png")
    return root


def test_on_tied_accuracies_the_earlier_best_is_kept_and_its_weights_are_exported(tmp_path, compile_cache):
    # One class: every evaluation is exactly 100% accurate, a tie by construction, while the
    # weights (BatchNorm's running statistics at least) change at every step. With a constant
    # learning rate, a one-epoch run takes the same steps as the first epoch of a two-epoch run,
    # so its final weights are the two-epoch run's weights at its first evaluation.
    folder = write_one_class_folder(tmp_path / "folder")
    flags = ["--dataset", str(folder), "--arch", "v1", "--width", "0.25", "--resolution", "32", "--eval-resize", "32",
             "--eval-crop", "32", "--batch-size", "4", "--lr", "0.01", "--schedule", "constant", "--warmup-epochs", "0",
             "--eval-every", "1", "--no-progress"]  # fmt: skip
    two = run(["-m", "train.main", *flags, "--epochs", "2", "--workdir", str(tmp_path / "two")], compile_cache)
    run(["-m", "train.main", *flags, "--epochs", "1", "--workdir", str(tmp_path / "one")], compile_cache)
    rows = map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())
    assert [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r] == [(2, 1.0), (4, 1.0)]
    assert "best:  accuracy 1.0000 (step 2)" in two.stdout

    def leaves(path):
        return jax.tree.leaves(serialization.msgpack_restore(path.read_bytes()))

    best, first_epoch, last = leaves(tmp_path / "two" / "best.msgpack"), leaves(tmp_path / "one" / "model.msgpack"), leaves(tmp_path / "two" / "model.msgpack")
    assert all(np.array_equal(a, b) for a, b in zip(best, first_epoch, strict=True))
    # The premise: the second epoch moved the weights, so exporting again at the tie would show.
    assert not all(np.array_equal(a, b) for a, b in zip(best, last, strict=True))


# Runs train.main and interrupts itself (SIGINT, as Ctrl-C does) as step $INTERRUPT_AT_STEP begins.
# Python's own Ctrl-C handler, as in a terminal: a process started with SIGINT ignored (a background
# job of a non-interactive shell; seen under the full suite's workers) keeps ignoring it, and would run on.
INTERRUPT_AT_STEP = KILL_DURING_STEP.replace("KILL_DURING_STEP", "INTERRUPT_AT_STEP").replace("signal.SIGKILL", "signal.SIGINT").replace(
    "import os, signal, sys\n", "import os, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
)


def test_ctrl_c_ends_in_one_line_saying_what_is_kept_and_the_rerun_says_it_resumes(tmp_path, compile_cache):
    flags = [*TINY, *TORCH, "--max-steps", "8", "--checkpoint-every", "2", "--workdir", str(tmp_path)]
    interrupted = run(["-c", INTERRUPT_AT_STEP, *flags], compile_cache, env={"INTERRUPT_AT_STEP": "6"}, check=False)
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr
    last = interrupted.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted.") and "checkpoint.pth" in last and "resumes" in last, last
    resumed = run(["-m", "train.main", *flags], compile_cache)
    assert "resuming from the checkpoint of step 4 (of 8)" in resumed.stdout
