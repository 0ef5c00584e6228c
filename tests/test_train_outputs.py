"""What training leaves in its workdir, apart from the runs themselves (tests/test_train_main.py):
every file readable by everyone (0644, like the weights files) and written whole or not at all;
the PyTorch path's checkpoint restored as saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train import compare, metrics, torch_step

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}, {"step": 2, "epoch": 1, "eval_loss": 1.4, "eval_accuracy": 0.5}]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def workdir_with_metrics(path: Path, rows=ROWS) -> Path:
    path.mkdir()
    for row in rows:
        metrics.append(path, row)
    return path


def test_metrics_jsonl_stays_readable_by_everyone_when_a_resumed_run_truncates_it(tmp_path):
    workdir = workdir_with_metrics(tmp_path / "run")
    metrics.truncate_after(workdir, 1)  # what a run resumed from step 1 does first
    assert metrics.read(workdir) == ROWS[:1]
    assert mode(workdir / metrics.METRICS_FILE) == 0o644


def test_curves_png_is_readable_by_everyone(tmp_path):
    workdir = workdir_with_metrics(tmp_path / "run")
    metrics.plot_workdir(workdir)
    path = workdir / metrics.CURVES_FILE
    assert path.read_bytes()[:8] == PNG_SIGNATURE and mode(path) == 0o644
    assert sorted(p.name for p in workdir.iterdir()) == [metrics.CURVES_FILE, metrics.METRICS_FILE]  # no temporary left


def test_compare_png_is_readable_by_everyone(tmp_path, capsys):
    a, b = workdir_with_metrics(tmp_path / "a"), workdir_with_metrics(tmp_path / "b")
    output = tmp_path / "both.png"
    assert compare.main([str(a), str(b), "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == PNG_SIGNATURE and mode(output) == 0o644
    assert capsys.readouterr().out.strip() == f"wrote {output}"


def test_run_json_is_written_whole_and_readable_by_everyone(tmp_path):
    from train import config as config_lib
    from train import plan, record
    from train.record import RUN_FILE

    config = config_lib.parse_config(["--framework", "torch", "--workdir", str(tmp_path)])
    run_plan = plan.Plan(10, 32, steps_per_epoch=2, total_steps=2, stop_step=2, checkpoint_every=2)
    record.write_run_file(tmp_path, record.describe(config, run_plan))

    path = tmp_path / RUN_FILE
    recorded = json.loads(path.read_text())
    # The run's identity (what a resume checks), plus the class names, the exports' preprocessing
    # and the head's activation (none here: no hidden layer).
    assert recorded == {**record.identity(config, run_plan), "class_names": [], "preprocessing": None, "head_activation": None}
    assert mode(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]


def tiny_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a momentum buffer to restore
    return model, optimizer


def test_torch_checkpoint_restores_model_optimizer_and_step(tmp_path):
    path = tmp_path / "checkpoints" / "checkpoint.pth"
    model, optimizer = tiny_model_and_optimizer(seed=0)
    torch_step.save_checkpoint(path, model, optimizer, step=7)
    restored_model, restored_optimizer = tiny_model_and_optimizer(seed=1)
    assert torch_step.restore_checkpoint(path, restored_model, restored_optimizer) == 7
    for name, value in model.state_dict().items():
        assert torch.equal(restored_model.state_dict()[name], value), name
    momentum = [s["momentum_buffer"] for s in optimizer.state.values()]
    restored = [s["momentum_buffer"] for s in restored_optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, restored, strict=True))
    assert mode(path) == 0o644


def test_no_torch_checkpoint_restores_step_0(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    assert torch_step.restore_checkpoint(tmp_path / "checkpoint.pth", model, optimizer) == 0


def test_a_torch_checkpoint_killed_while_saving_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    model, optimizer = tiny_model_and_optimizer(seed=0)
    torch_step.save_checkpoint(path, model, optimizer, step=2)
    before = path.read_bytes()

    def die_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", die_midway)
    with pytest.raises(KeyboardInterrupt):
        torch_step.save_checkpoint(path, model, optimizer, step=4)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
