"""`python -m parity.convert` and `python -m parity.report`: results, and one-line errors.

One real subprocess per tool checks the command line end to end; the other cases call `main(argv)`
in-process (same code, without paying for a new interpreter and JIT compilation each time).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import torch_ref
from parity import convert, report
from parity.io import load_flax_variables
from parity.layouts.flax import save_flax_variables
from parity.random_weights import random_torch_model
from parity.weights import torch_to_flax
from tests.cli_errors import assert_one_line_error

WIDTH = 0.35  # the smallest V2: the CLI's behaviour does not depend on the width


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def v2_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "v2.pth"
    torch.save(random_torch_model("v2", WIDTH, seed=21).state_dict(), path)
    return path


def test_convert_command_writes_flax_weights_and_verifies_them(v2_pth, tmp_path):
    dst = tmp_path / "v2.msgpack"
    result = run_cli("parity.convert", str(v2_pth), str(dst), "--arch", "v2", "--width", str(WIDTH), "--verify", "--resolution", "65")
    assert result.returncode == 0, result.stderr
    assert "relative L2" in result.stdout and "ok" in result.stdout
    expected = torch_to_flax(torch.load(v2_pth, weights_only=True), "v2", WIDTH)
    np.testing.assert_array_equal(load_flax_variables(dst)["params"]["features_0"]["stem"]["conv"]["kernel"], expected["params"]["features_0"]["stem"]["conv"]["kernel"])


def test_convert_command_on_a_truncated_file_prints_one_line_and_writes_nothing(v2_pth, tmp_path):
    src, dst = tmp_path / "truncated.pth", tmp_path / "out.msgpack"
    src.write_bytes(v2_pth.read_bytes()[:5000])
    result = run_cli("parity.convert", str(src), str(dst), "--arch", "v2", "--width", str(WIDTH))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "truncated.pth", "not a readable PyTorch checkpoint")
    assert not dst.exists()


def test_convert_flax_to_torch_loads_strictly_into_torch_ref(v2_pth, tmp_path):
    msgpack, pth = tmp_path / "v2.msgpack", tmp_path / "back.pth"
    save_flax_variables(torch_to_flax(torch.load(v2_pth, weights_only=True), "v2", WIDTH), msgpack)
    assert convert.main([str(msgpack), str(pth), "--arch", "v2", "--width", str(WIDTH)]) == 0
    torch_ref.MobileNetV2(width_mult=WIDTH).load_state_dict(torch.load(pth, weights_only=True), strict=True)


def test_convert_changes_pytorch_format(v2_pth, tmp_path):
    dst = tmp_path / "v2.safetensors"
    assert convert.main([str(v2_pth), str(dst), "--arch", "v2", "--width", str(WIDTH)]) == 0
    assert dst.stat().st_size > 0


def test_convert_verify_above_tolerance_exits_1_and_writes_nothing(v2_pth, tmp_path, capsys):
    dst = tmp_path / "out.msgpack"
    # Tolerance 0: float32 rounding alone (~1e-6) exceeds it.
    code = convert.main([str(v2_pth), str(dst), "--arch", "v2", "--width", str(WIDTH), "--verify", "--tolerance", "0", "--resolution", "33"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out
    assert not dst.exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["{src}", "{dst}", "--arch", "v2", "--width", "1.0"], ["these weights have width 0.35", "--width 0.35"]),
        (["{src}", "{dst}", "--arch", "v1", "--width", "0.35"], ["MobileNetV2", "not MobileNetV1", "--arch v2"]),
        (["{src}", "{tmp}/out.onnx", "--arch", "v2", "--width", "0.35"], ["unknown extension '.onnx'"]),
        (["{tmp}/absent.pth", "{dst}", "--arch", "v2"], ["absent.pth: no such file"]),
        (["{src}", "{tmp}/no/such/dir/out.msgpack", "--arch", "v2", "--width", "0.35"], ["does not exist"]),
        (["{src}", "{dst}", "--arch", "v3"], ["invalid choice: 'v3'"]),
        (["{src}", "{dst}", "--resolution", "16"], ["--resolution 16 is below 32"]),
        (["{src}", "{dst}", "--arch", "v2", "--width", "-1"], ["width_mult must be positive"]),
    ],
    ids=["other-width", "wrong-arch", "unknown-extension", "missing-file", "missing-directory", "unknown-arch", "resolution-below-32", "bad-width"],
)
def test_convert_bad_input_is_one_line_exit_2_no_output(v2_pth, tmp_path, capsys, args, fragments):
    dst = tmp_path / "out.msgpack"
    argv = [a.format(src=v2_pth, dst=dst, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_:
        convert.main(argv)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not dst.exists() and not (tmp_path / "out.onnx").exists()


def test_convert_foreign_file_is_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "notes.msgpack"
    src.write_text("not weights\n")
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(src), str(tmp_path / "out.pth"), "--arch", "v2"])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "not a readable Flax msgpack file")
    assert not (tmp_path / "out.pth").exists()


def test_report_command_prints_every_block_and_exits_0_in_float32():
    result = run_cli("parity.report", "--arch", "v2", "--width", str(WIDTH), "--resolution", "33")
    assert result.returncode == 0, result.stdout + result.stderr
    blocks = [line.split()[0] for line in result.stdout.splitlines() if line.startswith(("features_", "pool", "logits"))]
    assert blocks == [f"features_{i}" for i in range(19)] + ["pool", "logits"]
    assert "max|flax - torch| / max|torch|" in result.stdout
    assert "all 21 blocks within tolerance" in result.stdout


def test_report_marks_first_divergence_of_bfloat16_at_the_stem(capsys):
    # bfloat16 keeps 8 bits of mantissa: ~4e-3 relative rounding from the first convolution on.
    code = report.main(["--arch", "v1", "--width", "0.25", "--resolution", "33", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 1
    assert "first divergence at features_0" in out


def test_report_reads_weights_from_a_file(v2_pth, capsys):
    assert report.main(["--arch", "v2", "--width", str(WIDTH), "--weights", str(v2_pth), "--resolution", "33", "--reference", "torchvision"]) == 0
    assert f"weights {v2_pth}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--arch", "v1", "--reference", "torchvision"], "torchvision has no MobileNetV1"),
        (["--arch", "v2", "--weights", "absent.pth"], "no such file"),
        (["--arch", "v2", "--dtype", "float16"], "invalid choice: 'float16'"),
    ],
    ids=["torchvision-v1", "missing-weights", "unknown-dtype"],
)
def test_report_bad_input_is_one_line_exit_2(capsys, args, fragment):
    with pytest.raises(SystemExit) as exit_:
        report.main(args)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, fragment)
