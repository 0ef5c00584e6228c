"""Training paths beyond the default run, end to end in subprocesses on tiny runs: a TFDS dataset
(through `tfds.testing.mock_data`, nothing downloaded), `--precision bf16` in both frameworks, and
`python -m train.compare` on a JAX and a PyTorch run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import mobilenet_arch
import torch_ref
from tests.cli_errors import assert_one_line_error

# The helpers and shared runs of test_train_main (one compile cache per session, subprocess runs).
_spec = importlib.util.spec_from_file_location("train_main_tests", Path(__file__).with_name("test_train_main.py"))
_main_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main_tests)
TINY, TORCH, run, train_losses, load_params, load_state_dict = (
    _main_tests.TINY, _main_tests.TORCH, _main_tests.run, _main_tests.train_losses, _main_tests.load_params, _main_tests.load_state_dict,
)
compile_cache, baseline, torch_baseline = _main_tests.compile_cache, _main_tests.baseline, _main_tests.torch_baseline

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# --- a TFDS dataset ---------------------------------------------------------------------------

# Runs train.main with TFDS mocked: every split of every dataset holds $1 random examples shaped
# as the dataset's features say (cifar100: 32x32x3 images, 100 classes).
MOCK_TFDS = """
import sys
import tensorflow_datasets as tfds
from train import main
with tfds.testing.mock_data(num_examples=int(sys.argv[1])):
    code = main.main(sys.argv[2:])
sys.exit(code)
"""
MOCK_EXAMPLES = 32  # two steps of 16 per epoch, two eval batches


def test_tfds_dataset_trains_end_to_end_with_its_own_classes(tmp_path, compile_cache):
    args = ["-c", MOCK_TFDS, str(MOCK_EXAMPLES), *TINY, "--dataset", "cifar100", "--workdir", str(tmp_path)]
    run(args, compile_cache)
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2]  # one epoch of 32 // 16 steps, --log-every 1
    (evaluation,) = [r for r in rows if "eval_accuracy" in r]
    assert evaluation["step"] == 2 and evaluation["epoch"] == 1 and 0 <= evaluation["eval_accuracy"] <= 1
    assert all(math.isfinite(r.get("train_loss", r.get("eval_loss"))) for r in rows)
    # The classifier has cifar100's 100 classes (from the TFDS builder's info), in both files.
    classifier = mobilenet_arch.architecture("v1", 0.25, num_classes=100).flax_classifier
    assert load_params(tmp_path)["params"][classifier]["bias"].shape == (100,)
    torch_ref.create_model("v1", 0.25, num_classes=100).load_state_dict(load_state_dict(tmp_path), strict=True)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "checkpoints" / "2").is_dir()


# --- bfloat16 ---------------------------------------------------------------------------------

# The first step's loss, same weights and batch, bf16 against float32. bf16 keeps 8 bits of
# mantissa (2^-9 = 2e-3 relative rounding per operation); measured, the loss moves by 1.8e-3
# (JAX) and 1.3e-3 (PyTorch) relative, so 1e-2 leaves 5x room. At initialisation the loss is near
# ln(10) for any small logits, so this bound catches gross errors only (overflow, a lost cast);
# that the loss differs from float32's at all shows the computation ran in bf16.
BF16_LOSS_RTOL = 1e-2


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_bf16_run_has_finite_losses_and_saves_float32_weights(framework, request, tmp_path, compile_cache):
    fp32_run = request.getfixturevalue("baseline" if framework == "jax" else "torch_baseline")
    flags = [*TINY, *(TORCH if framework == "torch" else []), "--precision", "bf16", "--max-steps", "2"]
    run(["-m", "train.main", *flags, "--workdir", str(tmp_path)], compile_cache)
    losses = train_losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    first_fp32 = train_losses(fp32_run)[0]
    assert losses[0] != first_fp32  # computed in bf16 indeed
    np.testing.assert_allclose(losses[0], first_fp32, rtol=BF16_LOSS_RTOL)
    # Parameters and BatchNorm statistics stay float32 (bf16 is the computation's dtype only).
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(load_params(tmp_path))} == {np.dtype(np.float32)}
    dtypes = {name: value.dtype for name, value in load_state_dict(tmp_path).items() if not name.endswith("num_batches_tracked")}
    assert set(dtypes.values()) == {torch.float32}, dtypes


# --- train.compare ----------------------------------------------------------------------------

# matplotlib's default colour cycle, C0 and C1: the first and the second run's lines and markers.
FIRST_RUN_RGB, SECOND_RUN_RGB = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def test_compare_draws_a_jax_and_a_torch_run_in_one_png(baseline, torch_baseline, tmp_path, compile_cache):
    output = tmp_path / "compare.png"
    result = run(["-m", "train.compare", str(baseline), str(torch_baseline), "--output", str(output)], compile_cache)
    assert result.stdout.strip() == f"wrote {output}"
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(output) as image:
        image.verify()  # a complete, uncorrupted PNG
    pixels = np.asarray(Image.open(output).convert("RGB"))
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 400, pixels.shape
    # Both runs are drawn: each colour covers at least a marker's worth of pixels (a 6-point
    # marker at 100 dpi is ~50 pixels; antialiased edges blend, so only exact pixels count).
    for rgb in (FIRST_RUN_RGB, SECOND_RUN_RGB):
        assert (pixels == rgb).all(axis=-1).sum() >= 30, rgb


@pytest.mark.parametrize("problem", ["missing", "no-metrics"])
def test_compare_rejects_a_workdir_without_metrics_in_one_line_and_writes_nothing(problem, baseline, tmp_path, compile_cache):
    bad = tmp_path / "bad"
    if problem == "no-metrics":
        bad.mkdir()
    output = tmp_path / "out" / "compare.png"
    output.parent.mkdir()
    result = run(["-m", "train.compare", str(baseline), str(bad), "--output", str(output)], compile_cache, check=False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(bad))
    assert list(output.parent.iterdir()) == []  # no PNG, no temporary file
