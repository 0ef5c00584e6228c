"""A head with hidden layers (--head) end to end: trained on digits and written out with its hidden
layer; --init-from keeps a checkpoint's head when the class count matches, replaces only its
output layer otherwise, replaces all of it when --head is given, and says so in one line; --freeze
backbone trains every head layer and no backbone tensor, in both frameworks.

One short run on digits (`head_run`) is the checkpoint the others start from; what --init-from
reads and initialises is checked in-process (train/plan.py, train/runners.py), without training.
The runs use the compilation cache of tests/test_train_main.py.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import parity
from tests.shared import built_once
from tests.test_train_finetune import FINETUNE, folder  # noqa: F401 (a fixture)
from tests.test_train_main import TINY, compile_cache, run, shared_run  # noqa: F401 (a fixture)
from train import config as config_lib
from train import plan, runners

HIDDEN = 32
# Four steps of digits: enough to move every weight away from its initialisation.
HEAD_RUN = [*TINY, "--head", str(HIDDEN), "--max-steps", "4"]
# The torch run's new head, another size than the checkpoint's, so that nothing of it is kept.
NEW_HIDDEN = 16


@pytest.fixture(scope="session")
def head_run(tmp_path_factory, compile_cache) -> Path:  # noqa: F811
    return shared_run(tmp_path_factory, compile_cache, "head-run", HEAD_RUN)


def _frozen_flags(head_run, folder, framework: str) -> list[str]:  # noqa: F811
    # JAX keeps the checkpoint's hidden layer (a new 4-class output layer); torch gets --head's new head.
    extra = ["--head", str(NEW_HIDDEN)] if framework == "torch" else []
    flags = ["--init-from", str(head_run / "model.pth"), "--dataset", str(folder), *FINETUNE, "--max-steps", "3"]
    return [*flags, "--framework", framework, "--freeze", "backbone", *extra]


@pytest.fixture(scope="session")
def frozen_head_runs(tmp_path_factory, head_run, folder, compile_cache) -> dict:  # noqa: F811
    """--freeze backbone from the head run's .pth on a folder of 4 classes, in each framework:
    {framework: (workdir, its standard output)}."""
    out = {}
    for framework in ("jax", "torch"):
        flags = _frozen_flags(head_run, folder, framework)

        def train(workdir, flags=flags):
            result = run(["-m", "train.main", *flags, "--workdir", str(workdir)], compile_cache)
            (workdir / "stdout.txt").write_text(result.stdout)

        workdir = built_once(tmp_path_factory, f"frozen-head-{framework}", train)
        out[framework] = (workdir, (workdir / "stdout.txt").read_text())
    return out


def _plan(flags: list[str], workdir) -> plan.Plan:
    """What train.main makes of `flags` before any training (no run in `workdir`)."""
    config = config_lib.parse_config([*flags, "--workdir", str(workdir)])
    config, init, notes = plan.with_checkpoint(config)
    return config, plan.make(config, init, notes)


def _initial_variables(run_plan: plan.Plan, seed: int = 0) -> dict:
    """The variables a run of `run_plan` starts from: the runners draw new layers from the first
    half of the seed's key (train/runners.py)."""
    return runners.pretrained_variables(run_plan, jax.random.split(jax.random.key(seed))[0])


def _equal(a: dict, b: dict) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(map(np.array_equal, jax.tree.leaves(a), jax.tree.leaves(b)))


def test_head_trains_a_hidden_layer_that_the_written_weights_hold(head_run):
    for name in ("model.msgpack", "model.pth"):
        checkpoint = parity.load(head_run / name)
        head = checkpoint.architecture.head
        assert [(layer.units, layer.activation) for layer in head.layers] == [(HIDDEN, "relu"), (10, None)], name
    msgpack, pth = parity.load(head_run / "model.msgpack"), parity.load(head_run / "model.pth")
    for layer in ("hidden_0", "classifier"):
        assert _equal(msgpack.variables["params"][layer], pth.variables["params"][layer]), layer
    # The hidden layer trained: its weights are not those of its initialisation (normal(0, 0.01), zero bias).
    assert np.abs(np.asarray(msgpack.variables["params"]["hidden_0"]["bias"])).max() > 0


def test_init_from_with_the_same_classes_keeps_the_whole_head(head_run, tmp_path):
    config, run_plan = _plan(["--init-from", str(head_run / "model.pth")], tmp_path / "run")  # digits: 10 classes
    variables, checkpoint = _initial_variables(run_plan), parity.load(head_run / "model.pth")
    assert run_plan.new_head == () and run_plan.architecture.head.describe() == checkpoint.architecture.head.describe()
    assert _equal(variables, jax.device_get(checkpoint.variables))  # backbone, hidden and output layers
    assert plan.describe_init(config, run_plan).endswith("and the head")


def test_init_from_with_other_classes_replaces_only_the_output_layer(head_run, folder, tmp_path):  # noqa: F811
    config, run_plan = _plan(["--init-from", str(head_run / "model.pth"), "--dataset", str(folder)], tmp_path / "run")
    variables, checkpoint = _initial_variables(run_plan), parity.load(head_run / "model.pth")
    before = jax.device_get(checkpoint.variables)
    assert run_plan.new_head == ("classifier",)
    assert _equal(variables["params"]["hidden_0"], before["params"]["hidden_0"])
    assert variables["params"]["classifier"]["kernel"].shape == (HIDDEN, 4)
    backbone = {k: v for k, v in variables["params"].items() if k not in ("hidden_0", "classifier")}
    assert _equal(backbone, {k: before["params"][k] for k in backbone})
    assert _equal(variables["batch_stats"], before["batch_stats"])


def test_head_with_init_from_replaces_the_whole_head(head_run, tmp_path):
    flags = ["--init-from", str(head_run / "model.pth"), "--head", str(NEW_HIDDEN), "--head-activation", "gelu"]
    config, run_plan = _plan(flags, tmp_path / "run")
    variables = _initial_variables(run_plan)
    assert run_plan.new_head == ("hidden_0", "classifier")
    assert [(layer.units, layer.activation) for layer in run_plan.architecture.head.layers] == [(NEW_HIDDEN, "gelu"), (10, None)]
    assert variables["params"]["hidden_0"]["kernel"].shape == (256, NEW_HIDDEN)  # V1 at width 0.25: 256 features
    assert variables["params"]["classifier"]["kernel"].shape == (NEW_HIDDEN, 10)
    assert "replaced the head by --head's, all layers new: dense 16 (gelu) -> dense 10" in plan.describe_init(config, run_plan)


def test_head_flags_give_each_layer_its_units_activation_and_dropout(tmp_path):
    flags = ["--head", "8,4", "--head-activation", "silu", "--dropout", "0.1", "--head-dropout", "0.3"]
    _, run_plan = _plan(flags, tmp_path / "run")
    assert run_plan.architecture.head.describe() == "dropout 0.1 -> dense 8 (silu) -> dropout 0.3 -> dense 4 (silu) -> dropout 0.3 -> dense 10"


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_frozen_backbone_trains_every_head_layer_and_no_backbone_tensor(framework, frozen_head_runs, head_run, folder, tmp_path):  # noqa: F811
    workdir, _ = frozen_head_runs[framework]
    _, run_plan = _plan(_frozen_flags(head_run, folder, framework), tmp_path / "run")
    start = parity.flax_to_torch(_initial_variables(run_plan), "v1")
    after = torch.load(workdir / "model.pth", map_location="cpu", weights_only=True)
    backbone = [k for k in start if k.startswith("features.") and not k.endswith("num_batches_tracked")]
    head = [k for k in start if k.startswith("classifier.")]
    assert backbone and sorted(head) == ["classifier.1.bias", "classifier.1.weight", "classifier.3.bias", "classifier.3.weight"]
    assert after["classifier.1.weight"].shape[0] == (NEW_HIDDEN if framework == "torch" else HIDDEN)
    for key in backbone:  # weights, BatchNorm scale, bias, running mean and variance
        assert torch.equal(after[key], start[key]), key
    unchanged = [key for key in head if torch.equal(after[key], start[key])]
    assert not unchanged, unchanged


def test_init_from_says_what_it_read_kept_and_replaced(frozen_head_runs, head_run):
    _, stdout = frozen_head_runs["jax"]
    state = torch.load(head_run / "model.pth", map_location="cpu", weights_only=True)
    # Flax's tensors of the backbone: PyTorch's but its step counters.
    backbone = len([k for k in state if k.startswith("features.") and not k.endswith("num_batches_tracked")])
    line = next(line for line in stdout.splitlines() if line.startswith("init-from "))
    assert line == (
        f"init-from model.pth: torchvision MobileNetV1 width 0.25, head dense {HIDDEN} (relu) -> dense 10; "
        f"kept the backbone ({backbone} tensors) and the hidden layers (dense {HIDDEN} (relu)); "
        "replaced the 10-class output layer by a new 4-class one"
    )
    _, torch_stdout = frozen_head_runs["torch"]
    assert f"replaced the head by --head's, all layers new: dense {NEW_HIDDEN} (relu) -> dense 4" in torch_stdout


def test_init_from_names_what_parity_unwrapped_stripped_and_ignored(head_run, tmp_path):
    # A training framework's checkpoint: DataParallel's prefix on the keys, under "model" beside
    # the optimizer's state and the epoch.
    state = torch.load(head_run / "model.pth", map_location="cpu", weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "epoch": 3}, tmp_path / "trained.pth")
    config, run_plan = _plan(["--init-from", str(tmp_path / "trained.pth")], tmp_path / "run")
    line = plan.describe_init(config, run_plan)
    assert "kept the backbone" in line and "and the head" in line
    assert "a training checkpoint: read the weights under 'model'; ignored optimizer, epoch" in line
    assert "the keys start with 'module.' (DataParallel): the prefix was stripped" in line


def test_a_workdir_refuses_a_run_with_another_head(tmp_path):
    from train import record

    workdir = tmp_path / "run"
    config, run_plan = _plan(["--head", str(HIDDEN)], workdir)
    workdir.mkdir()
    record.write_run_file(workdir, record.describe(config, run_plan))
    with pytest.raises(ValueError, match=rf"holds another run \(hidden_units \[{HIDDEN}\] -> \[{NEW_HIDDEN}\]\)"):
        _plan(["--head", str(NEW_HIDDEN)], workdir)
    _plan(["--head", str(HIDDEN)], workdir)  # the same run resumes
