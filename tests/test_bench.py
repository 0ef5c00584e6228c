"""`python -m train.bench` runs end to end (a tiny configuration: the numbers are not checked,
only that every framework was timed and the table and JSON are written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train import bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_times_both_frameworks_and_writes_the_table_and_json(precision, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--arch", "v1", "--resolution", "32", "--batch", "4", "--repeats", "1", "--no-memory"]
    assert bench.main([*argv, "--precision", precision, "--frameworks", "jax,torch", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["framework"], r["precision"]) for r in rows] == [("jax", precision), ("torch", precision)]
    assert all(r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0 and len(r["train_step_s"]) == 1 for r in rows)
    table = capsys.readouterr().out
    assert f"| V1 | 32 | 4 | {precision} | jax" in table and f"| V1 | 32 | 4 | {precision} | torch |" in table


@pytest.mark.parametrize("flags", [["--precision", "fp16"], ["--frameworks", "tensorflow"], ["--resolution", "16"]])
def test_bench_rejects_bad_flags_in_one_line(flags):
    result = subprocess.run([sys.executable, "-m", "train.bench", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr, result.stderr
