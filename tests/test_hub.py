"""Hub names, offline: each library's own cache populated with files the test writes the way the
library writes them (transformers' `save_pretrained`, timm's `save_for_hf`, torchvision's
state-dict file under torch.hub's cache), then read by name as a user online would, nothing
downloaded. A name that is not cached, and a string that is neither a path nor a name, are one
line each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import parity
from parity.models import relative_l2
from parity.random_weights import randomize_batchnorm
from tests.cli_errors import assert_one_line_error

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

# float32 rounding through ~50 layers: up to 1e-5 relative L2 (tests/test_layouts.py).
TOLERANCE = 1e-5
REVISION = "0" * 40  # the commit a cached snapshot is filed under


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: what resolves comes from it alone."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def snapshot(cache: Path, repo: str) -> Path:
    """The folder huggingface_hub keeps `repo`'s files in, with refs/main pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    folder = root / "snapshots" / REVISION
    folder.mkdir(parents=True)
    return folder


def gap(ckpt, run) -> float:
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref = run(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    return relative_l2(np.asarray(ckpt.model.apply(ckpt.variables, x, train=False)), ref)


def test_a_transformers_repository_by_name(hub_cache):
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, num_labels=7)
    model = randomize_batchnorm(transformers.MobileNetV2ForImageClassification(config), 0).eval()
    model.save_pretrained(snapshot(hub_cache, "google/mobilenet_v2_0.35_96"))
    for name in ("google/mobilenet_v2_0.35_96", "hf-hub:google/mobilenet_v2_0.35_96"):
        ckpt = parity.load(name)
        assert ckpt.layout == "hf" and gap(ckpt, lambda x: model(pixel_values=x).logits) < TOLERANCE


def test_a_timm_model_by_name_reads_its_repository_and_pretrained_cfg(hub_cache):
    model = randomize_batchnorm(timm.create_model("mobilenetv2_050"), 1).eval()
    repo = timm.models.get_pretrained_cfg("mobilenetv2_050").hf_hub_id  # timm/mobilenetv2_050.lamb_in1k
    timm.models.save_for_hf(model, snapshot(hub_cache, repo))
    for name in ("mobilenetv2_050", "mobilenetv2_050.lamb_in1k", f"hf-hub:{repo}", repo):
        ckpt = parity.load(name)
        assert ckpt.layout == "timm" and gap(ckpt, model) < TOLERANCE, name
    # the weights' own preprocessing, as timm's resolve_data_config gives it
    data = timm.data.resolve_data_config({}, model=model)
    assert ckpt.preprocessing.interpolation == data["interpolation"] and ckpt.preprocessing.crop_size == data["input_size"][-1]
    assert ckpt.preprocessing.mean == tuple(data["mean"])


def test_torchvision_weights_by_enum_from_torch_hubs_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    model = randomize_batchnorm(torchvision.models.mobilenet_v2(), 2).eval()
    (tmp_path / "torch_hub" / "checkpoints").mkdir(parents=True)
    torch.save(model.state_dict(), tmp_path / "torch_hub" / "checkpoints" / Path(weights.url).name)
    ckpt = parity.load("MobileNet_V2_Weights.IMAGENET1K_V2")
    assert gap(ckpt, model) < TOLERANCE
    transforms = weights.transforms()  # the enum's own: resize 232, crop 224
    assert (ckpt.preprocessing.resize_size, ckpt.preprocessing.crop_size) == (transforms.resize_size[0], transforms.crop_size[0])


def run_convert(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.convert", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_a_name_not_in_the_cache_offline_is_one_line(tmp_path):
    result = run_convert({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}, "google/mobilenet_v2_1.0_224", str(tmp_path / "out.msgpack"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "google/mobilenet_v2_1.0_224", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert not (tmp_path / "out.msgpack").exists()


def test_neither_a_path_nor_a_name_names_both_forms(hub_cache):
    with pytest.raises(parity.WeightsFileError, match="no such file or directory, nor a model name: expected a file, a directory, hf-hub:"):
        parity.load("mobilenet_v2_weights_that_are_not_here")


def test_a_missing_file_is_a_missing_file_not_a_hub_name(hub_cache):
    with pytest.raises(parity.WeightsFileError, match=r"^weights/model\.pth: no such file or directory$"):
        parity.load("weights/model.pth")


@pytest.mark.parametrize("name", ["./missing_hf_dir", "~/missing_hf_dir"])
def test_a_missing_local_directory_is_not_looked_up_on_the_hub(hub_cache, name):
    with pytest.raises(parity.WeightsFileError, match="no such file or directory$"):
        parity.load(name)
