"""Fine-tuning end to end, in subprocesses: a brief pretraining on digits, then `--init-from` its
exported .pth on a folder of PNGs (`--dataset DIR`) with a new classifier, in both frameworks;
frozen layers, the workdir's lock, `train.predict`, and the feature extractor (num_classes=0).

The runs are shared by the tests that read them (session fixtures) and use the compilation cache
of tests/test_train_main.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import mobilenet_arch
import pytest
import torch
from PIL import Image

import flax_mobilenet
import parity
import torch_ref
from tests.cli_errors import assert_one_line_error
from tests.shared import built_once
from tests.test_train_main import ROOT, compile_cache, environment, run, shared_run  # noqa: F401 (a fixture)
from train import lock

# Digits 0-3 as 32x32 PNGs under class names that sort in another order than the digits (ImageFolder
# sorts by name: one, three, two, zero), 120 for training and 40 for evaluation each.
CLASSES = {"zero": 0, "one": 1, "two": 2, "three": 3}
TRAIN_PER_CLASS, EVAL_PER_CLASS = 120, 40
# One epoch of digits: MobileNetV1 at width 0.25 reaches ~50% (10 classes), with BatchNorm
# statistics settled, which a frozen backbone needs (after 8 steps every input gives the same
# features in inference mode).
PRETRAIN = "--arch v1 --width 0.25 --batch-size 16 --epochs 1 --lr 0.04 --warmup-epochs 0 --no-progress".split()
# Three epochs of 30 steps on the folder (decoded in threads of the training process, the
# default); crops of at least 60% of the image, no flip (digits are not symmetric). The .pth
# carries no preprocessing: its run's run.json gives 32 px (see predict).
FINETUNE = (
    "--batch-size 16 --epochs 3 --lr 0.1 --warmup-epochs 0 --no-progress --crop-scale 0.6 1 --hflip 0"
).split()
CHANCE = 1 / len(CLASSES)


@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> Path:
    # One folder for all of pytest's workers (pytest-xdist): the shared runs record its
    # path, and a run resumed with another --dataset is refused.
    return built_once(tmp_path_factory, "digit-folder", _write_digit_folder)


def _write_digit_folder(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in CLASSES.items():
        index = np.flatnonzero(digits.target == digit)
        for split, chosen in (("train", index[:TRAIN_PER_CLASS]), ("val", index[TRAIN_PER_CLASS : TRAIN_PER_CLASS + EVAL_PER_CLASS])):
            (root / split / name).mkdir(parents=True)
            for i in chosen:
                grey = Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8))
                grey.resize((32, 32), Image.Resampling.BILINEAR).convert("RGB").save(root / split / name / f"{i}.png")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, compile_cache) -> Path:  # noqa: F811
    return shared_run(tmp_path_factory, compile_cache, "finetune-pretrained", PRETRAIN)


def finetune_flags(pretrained: Path, folder: Path, *flags: str) -> list[str]:
    return ["--init-from", str(pretrained / "model.pth"), "--dataset", str(folder), *FINETUNE, *flags]


@pytest.fixture(scope="session")
def frozen_runs(tmp_path_factory, pretrained, folder, compile_cache) -> dict[str, Path]:  # noqa: F811
    """--freeze backbone in each framework: the classifier alone trains, a new one for 4 classes."""
    return {
        framework: shared_run(
            tmp_path_factory, compile_cache, f"frozen-{framework}", finetune_flags(pretrained, folder, "--framework", framework, "--freeze", "backbone")
        )
        for framework in ("jax", "torch")
    }


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def evaluations(workdir: Path) -> list[dict]:
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r]


# PyTorch's step counters are not statistics: the exported ones count the fine-tuning's steps.
def _tensors(state: dict, prefix: str = "features.") -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_frozen_backbone_comes_out_bit_identical_with_a_new_classifier(framework, frozen_runs, pretrained):
    workdir = frozen_runs[framework]
    before, after = state_dict(pretrained / "model.pth"), state_dict(workdir / "model.pth")
    backbone = _tensors(before)
    assert backbone and backbone.keys() == _tensors(after).keys()
    for key, value in backbone.items():  # weights, BatchNorm scale, bias, running mean and variance
        assert torch.equal(after[key], value), key
    assert after["classifier.1.weight"].shape == (len(CLASSES), 256) and after["classifier.1.bias"].shape == (len(CLASSES),)
    assert before["classifier.1.weight"].shape == (10, 256)
    # The .msgpack holds the same weights.
    flax = parity.load(workdir / "model.msgpack")
    assert all(torch.equal(torch.from_numpy(np.asarray(v)), after[k]) for k, v in parity.flax_to_torch(flax.variables, "v1").items() if k in backbone)


def test_the_classifier_learns_the_folders_classes_far_above_chance_alike_in_both_frameworks(frozen_runs, capsys):
    accuracies = {framework: evaluations(workdir)[-1]["eval_accuracy"] for framework, workdir in frozen_runs.items()}
    with capsys.disabled():
        print(f"\nfine-tuned with a frozen backbone: accuracy {accuracies}, chance {CHANCE}")
    # Measured 0.64 to 0.66, the same in both frameworks (a linear classifier on a backbone that reached ~50% on
    # the 10 digits); a head that learned nothing stays at chance, 0.25.
    assert min(accuracies.values()) > 2 * CHANCE
    # Same batches, learning rates and starting weights; float32 rounding differs between the
    # frameworks: a few of the 160 evaluation images at most.
    assert abs(accuracies["jax"] - accuracies["torch"]) <= 3 / 160, accuracies


def test_a_run_records_its_classes_and_preprocessing_and_says_what_it_wrote(frozen_runs, pretrained, folder, compile_cache):  # noqa: F811
    workdir = frozen_runs["jax"]
    # Run again, the finished run exports its weights again and says what it wrote.
    stdout = run(["-m", "train.main", *finetune_flags(pretrained, folder, "--freeze", "backbone"), "--workdir", str(workdir)], compile_cache).stdout
    recorded = json.loads((workdir / "run.json").read_text())
    assert recorded["class_names"] == sorted(CLASSES)  # ImageFolder's order
    assert (recorded["preprocessing"]["crop_size"], recorded["frozen_blocks"]) == (32, 14)
    assert json.loads((workdir / "model.msgpack.json").read_text())["class_names"] == sorted(CLASSES)
    best = max(evaluations(workdir), key=lambda r: r["eval_accuracy"])
    lines = stdout.strip().splitlines()[-5:]
    assert lines[0].startswith(f"final: accuracy {evaluations(workdir)[-1]['eval_accuracy']:.4f}")
    assert lines[1] == f"best:  accuracy {best['eval_accuracy']:.4f} (step {best['step']}): {workdir / 'best.msgpack'}, {workdir / 'best.pth'}"
    assert lines[2:] == [
        f"weights: {workdir / 'model.msgpack'}, {workdir / 'model.pth'}",
        f"metrics: {workdir / 'metrics.jsonl'}",
        f"curves:  {workdir / 'curves.png'}",
    ]
    # best.* hold the weights of the best evaluation, as .msgpack (with its description) and .pth.
    assert parity.load(workdir / "best.msgpack").architecture.num_classes == len(CLASSES)


@pytest.mark.parametrize("framework, weights", [("jax", "model.msgpack"), ("torch", "model.pth")])
def test_eval_on_the_folder_reads_arch_classes_and_preprocessing_from_the_checkpoint(framework, weights, frozen_runs, folder, compile_cache):  # noqa: F811
    workdir = frozen_runs["jax"]
    args = ["-m", "train.eval", "--weights", str(workdir / weights), "--dataset", str(folder), "--framework", framework]
    last = run(args, compile_cache).stdout.strip().splitlines()[-1]
    # The run's own last evaluation, on the same 32-px centre crops: equal but for a prediction that
    # float32 rounding at another batch size (100 here, 16 in the run) could flip (1/160 each).
    assert abs(float(last.removeprefix("accuracy=")) - evaluations(workdir)[-1]["eval_accuracy"]) <= 1 / 160, last
    wrong = run(args + ["--arch", "v2"], compile_cache, check=False)
    assert wrong.returncode == 2 and "not MobileNetV2" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def test_eval_refuses_a_checkpoint_of_other_classes_than_the_datasets(pretrained, folder, compile_cache):  # noqa: F811
    # The pretrained run has the 10 digits; the folder 4 classes: an accuracy would mean nothing.
    result = run(["-m", "train.eval", "--weights", str(pretrained / "model.pth"), "--dataset", str(folder)], compile_cache, check=False)
    assert result.returncode == 2 and "has 10 classes" in result.stderr and f"{folder} has 4" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_trainable_blocks_train_the_last_blocks_and_freeze_the_rest(framework, tmp_path, pretrained, folder, compile_cache):  # noqa: F811
    # The workdir holds the lock file of a killed run: a dead process's lock does not block.
    killed = subprocess.run(
        [sys.executable, "-c", f"import os, signal; from train import lock\nwith lock.held({str(tmp_path)!r}): os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=ROOT, env=environment(compile_cache),
    )
    assert killed.returncode == -signal.SIGKILL and (tmp_path / lock.LOCK_FILE).read_text().startswith("pid ")
    flags = finetune_flags(pretrained, folder, "--framework", framework, "--trainable-blocks", "2", "--max-steps", "5")
    run(["-m", "train.main", *flags, "--workdir", str(tmp_path)], compile_cache)
    before, after = state_dict(pretrained / "model.pth"), state_dict(tmp_path / "model.pth")
    for index in range(14):  # V1: the stem, 13 depthwise-separable blocks
        block = _tensors(before, f"features.{index}.")
        changed = [key for key in block if not torch.equal(after[key], block[key])]
        if index < 12:
            assert not changed, (index, changed)
        else:  # the last two blocks train: every weight, and (training-mode BatchNorm) the statistics
            assert len(changed) == len(block), (index, sorted(set(block) - set(changed)))


def test_a_second_run_in_a_busy_workdir_refuses_at_once_naming_the_holder(tmp_path, pretrained, folder, compile_cache):  # noqa: F811
    with lock.held(tmp_path):
        args = ["-m", "train.main", *finetune_flags(pretrained, folder), "--workdir", str(tmp_path)]
        result = run(args, compile_cache, check=False, timeout=120)
        assert sorted(p.name for p in tmp_path.iterdir()) == [lock.LOCK_FILE]  # nothing else written
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(tmp_path), "in use", f"pid {os.getpid()}")
    assert not (tmp_path / lock.LOCK_FILE).exists()  # the holder's file goes with it


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--arch", "v2"], "these weights are MobileNetV1 width 0.25, not MobileNetV2"),
        (["--width", "0.5"], "these weights have width 0.25"),
        (["--trainable-blocks", "15"], "MobileNetV1 has 14 blocks in features"),
    ],
    ids=["arch", "width", "trainable-blocks"],
)
def test_flags_that_contradict_the_checkpoint_fail_with_one_line_before_any_work(flags, expected, tmp_path, pretrained, folder, compile_cache):  # noqa: F811
    workdir = tmp_path / "run"
    result = run(["-m", "train.main", *finetune_flags(pretrained, folder, *flags), "--workdir", str(workdir)], compile_cache, check=False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, expected)
    assert not workdir.exists()


def _predictions(stdout: str) -> dict[str, list[tuple[float, int, str]]]:
    """{image: [(probability, class, name)]} from train.predict's output."""
    out: dict[str, list] = {}
    for line in stdout.splitlines():
        if match := re.fullmatch(r"  (\d\.\d{4})\s+(\d+)  (.*)", line):
            out[image].append((float(match[1]), int(match[2]), match[3]))
        else:
            image = line
            out[image] = []
    return out


def test_predict_gives_each_images_classes_by_name_the_same_in_both_frameworks(frozen_runs, folder, compile_cache):  # noqa: F811
    workdir = frozen_runs["jax"]
    images = [str(next((folder / "val" / name).iterdir())) for name in ("two", "zero")]
    # .msgpack in JAX, .pth (its preprocessing from run.json) in PyTorch.
    jax_out = _predictions(run(["-m", "train.predict", "--weights", str(workdir / "model.msgpack"), *images], compile_cache).stdout)
    torch_out = _predictions(
        run(["-m", "train.predict", "--weights", str(workdir / "model.pth"), "--framework", "torch", *images], compile_cache).stdout
    )
    assert list(jax_out) == list(torch_out) == images
    for image in images:
        assert len(jax_out[image]) == len(CLASSES)  # top 5 of 4 classes: all of them
        assert {name for _, _, name in jax_out[image]} == set(CLASSES)
        assert [c for _, c, _ in jax_out[image]] == [c for _, c, _ in torch_out[image]]
        # Four decimals printed; the frameworks' probabilities agree to ~1e-6.
        np.testing.assert_allclose([p for p, _, _ in jax_out[image]], [p for p, _, _ in torch_out[image]], atol=1.5e-4)
        assert abs(sum(p for p, _, _ in jax_out[image]) - 1) < 1e-3


def test_predict_refuses_a_missing_image_before_loading_anything(compile_cache):  # noqa: F811
    result = run(["-m", "train.predict", "--weights", "README.md", "no_such.png"], compile_cache, check=False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "no_such.png: no such image file")


def test_num_classes_0_is_a_feature_extractor_returning_the_pooled_features(pretrained):
    checkpoint = parity.load(pretrained / "model.pth")
    features_arch = mobilenet_arch.with_classes(checkpoint.architecture, 0)
    params = {k: v for k, v in checkpoint.variables["params"].items() if k != "classifier"}
    variables = {"params": params, "batch_stats": checkpoint.variables["batch_stats"]}
    images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    features = np.asarray(flax_mobilenet.MobileNet(features_arch).apply(variables, images, train=False))
    assert features.shape == (4, checkpoint.architecture.num_features)
    # The classifier applied to them gives the whole model's logits.
    head = checkpoint.variables["params"]["classifier"]
    logits = np.asarray(checkpoint.model.apply(checkpoint.variables, images, train=False))
    np.testing.assert_allclose(features @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)
    # torch_ref: the same features from the same weights (its classifier holds no tensors).
    model = torch_ref.MobileNet(features_arch).eval()
    model.load_state_dict({k: v for k, v in state_dict(pretrained / "model.pth").items() if not k.startswith("classifier")})
    with torch.no_grad():
        torch_features = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(torch_features, features, rtol=1e-5, atol=1e-5)  # float32, as the parity tests
