"""`python -m bench.latency` runs end to end (a tiny configuration: the numbers are not checked, only
that every runtime asked for was timed in each thread count's process and the table and JSON are
written), its table's layout, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from bench import latency
from tests.cli_errors import assert_one_line_error


def test_latency_times_each_runtime_per_thread_count_and_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["--arch", "v1", "--batch", "2", "--threads", "1", "--runtimes", "jax,onnxruntime-int8,stablehlo", "--resolution", "32", "--repeats", "1", "--out", str(out)]
    assert latency.main(argv) == 0
    payload = json.loads(out.read_text())
    assert [(r["runtime"], r["batch"], r["threads"]) for r in payload["rows"]] == [("jax", 2, 1), ("onnxruntime-int8", 2, 1), ("stablehlo", 2, 1)]
    assert all(r["median_ms"] > 0 and len(r["call_s"]) == 1 for r in payload["rows"])
    assert set(payload["check_relative_l2"]["v1"]) == {"onnxruntime-int8", "stablehlo"}
    assert payload["check_relative_l2"]["v1"]["onnxruntime-int8"] > 0  # int8 against the float32 file: never exact
    assert "| V1 | 32 | 2 | 1 |" in capsys.readouterr().out


def test_table_has_a_column_per_runtime_and_ratios_to_onnxruntime():
    rows = [
        {"arch": "v2", "resolution": 224, "batch": 1, "threads": 2, "runtime": runtime, "median_ms": ms}
        for runtime, ms in (("jax", 13.2), ("torch", 24.0), ("onnxruntime", 6.6), ("onnxruntime-int8", 3.6))
    ]
    header, _, line = latency.markdown_table(rows).splitlines()
    assert header == "| model | input | batch | threads | JAX jit ms | PyTorch eager ms | onnxruntime ms | onnxruntime int8 ms |"
    assert line == "| V2 | 224 | 1 | 2 | 13.2 (2.0x) | 24.0 (3.6x) | 6.6 | 3.6 (0.55x) |"


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--threads", "64"], "choose at most"),
        (["--batch", "0"], "positive integers"),
        (["--runtimes", "tensorflow"], "comma-separated subset"),
        (["--repeats", "0"], "at least 1"),
        (["--resolution", "16"], "below 32"),
        (["--out", "missing/latency.json"], "does not exist"),
    ],
)
def test_latency_rejects_bad_flags_in_one_line(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        latency.main(flags)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, fragment)
