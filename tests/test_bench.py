"""`python -m bench` runs end to end (a tiny configuration: the numbers are not checked,
only that every framework was timed and the table and JSON are written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli, depthwise, plain, runners, throughput, timing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_times_both_frameworks_and_writes_the_table_and_json(precision, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--arch", "v1", "--resolution", "32", "--batch", "4", "--repeats", "1", "--no-memory"]
    frameworks = ["jax", "torch", "torch-channels-last"]
    assert cli.main([*argv, "--precision", precision, "--frameworks", ",".join(frameworks), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["framework"], r["precision"]) for r in rows] == [(name, precision) for name in frameworks]
    assert all(r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0 and len(r["train_step_s"]) == 1 for r in rows)
    table = capsys.readouterr().out
    assert f"| V1 | 32 | 4 | {precision} | jax" in table and f"| V1 | 32 | 4 | {precision} | torch |" in table


def test_the_channels_last_runner_keeps_model_and_batch_in_channels_last_memory():
    import torch

    runner = runners.make_runner("torch-channels-last", "v1", 32, 2)
    weight = runner.model.features[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert runners.make_runner("torch", "v1", 32, 2).model.features[0][0].weight.is_contiguous()


def test_the_plain_user_script_runs_in_fresh_processes_in_both_malloc_columns(tmp_path):
    # What it times is the user's view (README's API only); here only that it runs and reports.
    out = tmp_path / "plain.json"
    argv = ["--arch", "v1", "--resolution", "32", "--batch", "2", "--processes", "1", "--repeats", "1", "--out", str(out)]
    assert plain.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["column"] for r in rows] == list(plain.COLUMNS)
    for row in rows:
        for name in ("jax", "torch", "torch-channels-last"):
            assert row[f"{name}_train_img_s"] > 0 and row[f"{name}_infer_img_s"] > 0


def test_bench_times_keras_on_jax_beside_the_others(tmp_path):
    try:
        runners.keras_module()  # with its backend set, as the bench imports it
    except ImportError:
        pytest.skip("keras is not installed")
    out = tmp_path / "bench.json"
    argv = ["--arch", "v1", "--resolution", "32", "--batch", "2", "--repeats", "1", "--no-memory", "--frameworks", "keras"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["framework"] == "keras" and row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
    assert row["compile_s"] is not None


def test_bench_depthwise_times_every_implementation_in_both_phases(monkeypatch):
    monkeypatch.setattr(timing, "SETTLE_SECONDS", 0)  # the pause keeps timings apart; nothing is timed here
    rows = depthwise.depthwise_microbench(1, batch=2, size=8, channels=8)
    assert {(r["stride"], r["impl"], r["phase"]) for r in rows} == {
        (stride, impl, phase)
        for stride in (1, 2)
        for impl in ("jax xla", "jax shifted", "jax native", "torch")
        for phase in ("forward", "forward+backward")
    }
    assert "| forward | 1 | jax native |" in depthwise.depthwise_table(rows)


def test_saved_results_render_as_the_table():
    payload = json.loads((ROOT / "bench" / "results_cpu.json").read_text())
    table = throughput.markdown_table(payload["rows"]).splitlines()
    assert len(table) == 2 + len(payload["rows"]) and table[2].startswith("| V1 | 224 |")


def test_bench_help_runs_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--frameworks" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "flags", [["--precision", "fp16"], ["--frameworks", "tensorflow"], ["--resolution", "16"], ["--repeats", "0"], ["--out", "missing/bench.json"]]
)
def test_bench_rejects_bad_flags_in_one_line(flags):
    result = subprocess.run([sys.executable, "-m", "bench", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr, result.stderr
