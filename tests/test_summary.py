"""`python -m flax_mobilenet.summary`: the paper's per-layer table with totals."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mobilenet_arch
from flax_mobilenet import summary
from tests.cli_errors import assert_one_line_error


def test_summary_command_prints_the_table_and_totals():
    result = subprocess.run(
        [sys.executable, "-m", "flax_mobilenet.summary", "--arch", "v1", "--width", "0.5", "--resolution", "160"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for column in ("Type / Stride", "Filter Shape", "Input Size", "Params", "Mult-Adds"):
        assert column in out
    assert "Conv dw / s2" in out and "3 x 3 x 32 dw" in out and "160 x 160 x 3" in out
    # Howard et al., Table 7: 0.50 MobileNet-160 has 1.32M parameters and 76M mult-adds.
    assert "1,331,592 (1.33M) from the table, 1,331,592 in the Flax model (equal)" in out
    assert "multiply-adds: 76,524,800 (76.5M)" in out


@pytest.mark.parametrize("arch, width", [("v1", 0.25), ("v1", 1.0), ("v2", 0.35), ("v2", 1.4)])
def test_table_total_equals_the_flax_models_parameters(arch, width):
    architecture = mobilenet_arch.architecture(arch, width)
    table = sum(row["params"] for row in mobilenet_arch.layer_table(architecture))
    assert summary.flax_parameter_count(architecture, 224) == table


def test_one_row_per_layer_plus_pool_and_classifier():
    rows = mobilenet_arch.layer_table(mobilenet_arch.mobilenet_v1(1.0))
    assert len(rows) == 1 + 2 * 13 + 2  # stem, 13 depthwise-separable blocks, pool, FC (Table 1)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--arch", "v1", "--width", "0"], "width_mult must be positive"),
        (["--arch", "v1", "--resolution", "0"], "--resolution must be positive"),
        (["--arch", "v3"], "invalid choice: 'v3'"),
    ],
    ids=["width", "resolution", "arch"],
)
def test_bad_flags_are_one_line_errors(capsys, flags, fragment):
    with pytest.raises(SystemExit) as exit_:
        summary.main(flags)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, fragment)
