"""Weight conversion and weight files: round trips are bit-exact, bad input is named.

Round trips use random weights and randomised BatchNorm statistics, so every tensor holds values
that a dropped or swapped entry would change.
"""

from __future__ import annotations

import pickle

import flax.serialization
import jax
import numpy as np
import pytest
import torch

import flax_mobilenet
from parity.io import (
    WeightsFileError,
    load_flax_variables,
    load_torch_state_dict,
    save_torch_state_dict,
)
from parity.layouts.flax import save_flax_variables
from parity.random_weights import random_torch_model
from parity.layouts import ConversionError
from parity.weights import flax_to_torch, load_as_flax, torch_to_flax

# Round trips use a small width: the rules are the same for every width, and the error tests
# name widths explicitly.
WIDTH = 0.5


@pytest.fixture(scope="module", params=["v1", "v2"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def state_dict(arch):
    sd = random_torch_model(arch, WIDTH, seed=11).state_dict()
    return {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def variables(arch):
    """Flax variables in the structure and shapes of the Flax model, filled with random values."""
    model = flax_mobilenet.create_model(arch, WIDTH)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    # eval_shape: the real model's tree without paying for compiling its initialisers.
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(13)
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype), dict(shapes))


def assert_state_dicts_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


def assert_variables_equal(got, expected):
    got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    expected_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert got_flat.keys() == expected_flat.keys()
    for path, value in expected_flat.items():
        assert np.asarray(got_flat[path]).dtype == value.dtype, path
        assert np.array_equal(np.asarray(got_flat[path]), value), path


def test_torch_to_flax_to_torch_is_bit_exact(arch, state_dict):
    state_dict = {k: (torch.full_like(v, 7) if k.endswith("num_batches_tracked") else v) for k, v in state_dict.items()}
    # Flax keeps no step counter: flax_to_torch writes the one it is given.
    back = flax_to_torch(torch_to_flax(state_dict, arch, WIDTH), arch, num_batches_tracked=7)
    assert_state_dicts_equal(back, state_dict)


def test_flax_to_torch_to_flax_is_bit_exact(arch, variables):
    assert_variables_equal(torch_to_flax(flax_to_torch(variables, arch), arch, WIDTH), variables)


def test_converted_weights_do_not_share_memory_with_the_source(arch, state_dict):
    # A PyTorch model trained on after conversion must not change the Flax variables.
    source = {k: v.clone() for k, v in state_dict.items()}
    variables = torch_to_flax(source, arch, WIDTH)
    for v in source.values():
        v.add_(1)
    assert_variables_equal(variables, torch_to_flax(state_dict, arch, WIDTH))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_torch_file_round_trip_is_bit_exact(arch, state_dict, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    save_torch_state_dict(state_dict, path)
    assert_state_dicts_equal(load_torch_state_dict(path), state_dict)


def test_flax_file_round_trip_is_bit_exact(arch, variables, tmp_path):
    path = tmp_path / "weights.msgpack"
    save_flax_variables(variables, path)
    assert_variables_equal(load_flax_variables(path), variables)


@pytest.mark.parametrize("entry", ["state_dict", "model", "model_state_dict"])
def test_training_checkpoint_holding_a_state_dict_loads(state_dict, tmp_path, entry):
    path = tmp_path / "checkpoint.pth"
    torch.save({entry: state_dict, "epoch": 3}, path)
    assert_state_dicts_equal(load_torch_state_dict(path), state_dict)


def test_load_as_flax_reads_either_framework(arch, state_dict, tmp_path):
    save_torch_state_dict(state_dict, tmp_path / "w.safetensors")
    save_flax_variables(torch_to_flax(state_dict, arch, WIDTH), tmp_path / "w.msgpack")
    assert_variables_equal(load_as_flax(tmp_path / "w.msgpack", arch, WIDTH), load_as_flax(tmp_path / "w.safetensors", arch, WIDTH))


# Errors name the problem.


def test_missing_keys_are_listed(state_dict, arch):
    broken = dict(state_dict)
    del broken["features.3.conv.1.0.weight"]  # a pointwise (V1) or depthwise (V2) convolution
    with pytest.raises(ConversionError, match=r"1 missing keys: features\.3\.conv\.1\.0\.weight"):
        torch_to_flax(broken, arch, WIDTH)


def test_unexpected_keys_are_listed(state_dict, arch):
    with pytest.raises(ConversionError, match=r"1 unexpected keys: extra\.weight"):
        torch_to_flax({**state_dict, "extra.weight": torch.zeros(3)}, arch, WIDTH)


def test_wrong_shape_names_the_layer_and_both_shapes(state_dict, arch):
    key = "features.2.conv.0.1.weight"
    expected = tuple(state_dict[key].shape)
    broken = {**state_dict, key: torch.zeros(expected[0] + 1)}
    with pytest.raises(ConversionError, match=rf"{key}: shape \({expected[0] + 1},\) in the weights, \({expected[0]},\) expected"):
        torch_to_flax(broken, arch, WIDTH)


def test_weights_of_another_width_name_their_width(state_dict, arch):
    with pytest.raises(ConversionError, match=rf"these weights have width {WIDTH}"):
        torch_to_flax(state_dict, arch, 1.0)


def test_flax_variables_of_another_width_name_their_width(variables, arch, tmp_path):
    save_flax_variables(variables, tmp_path / "w.msgpack")
    with pytest.raises(ConversionError, match=rf"these weights have width {WIDTH}"):
        load_as_flax(tmp_path / "w.msgpack", arch, 1.0)


def test_flax_variables_with_extra_entries_are_refused(variables, arch, tmp_path):
    extra = {"params": {**variables["params"], "extra": {"kernel": np.zeros(3, np.float32)}}, "batch_stats": variables["batch_stats"]}
    save_flax_variables(extra, tmp_path / "w.msgpack")
    with pytest.raises(ConversionError, match="params/extra/kernel"):
        load_as_flax(tmp_path / "w.msgpack", arch, WIDTH)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".msgpack"])
def test_truncated_file_is_refused(state_dict, arch, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".msgpack":
        save_flax_variables(torch_to_flax(state_dict, arch, WIDTH), path)
    else:
        save_torch_state_dict(state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsFileError, match="not a readable"):
        load_as_flax(path, arch, WIDTH)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".msgpack"])
def test_file_of_another_kind_is_refused(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_text("this is a README, not weights\n" * 20)
    with pytest.raises(WeightsFileError, match="not a readable"):
        load_as_flax(path, "v2", 1.0)


def test_pytorch_file_holding_no_state_dict_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsFileError, match="not a state dict"):
        load_torch_state_dict(path)


def test_msgpack_holding_other_data_is_refused(tmp_path):
    path = tmp_path / "w.msgpack"
    path.write_bytes(flax.serialization.msgpack_serialize({"weights": np.zeros(3)}))
    with pytest.raises(WeightsFileError, match="not Flax variables"):
        load_flax_variables(path)


class _Exploit:
    """A pickle that creates a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_code_from_a_pickle(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "w.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.0.0.weight": _Exploit(marker)}, f, protocol=2)  # torch.save's protocol
    with pytest.raises(WeightsFileError):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(WeightsFileError, match=r"unknown extension '\.onnx'"):
        load_as_flax(tmp_path / "w.onnx", "v2", 1.0)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsFileError, match="no such file"):
        load_torch_state_dict(tmp_path / "absent.pth")


def test_failed_write_leaves_no_file_and_keeps_the_old_one(state_dict, tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"previous")

    def fail_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_torch_state_dict(state_dict, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temporary file left


def test_writing_into_a_missing_directory_is_a_weights_file_error(state_dict, tmp_path):
    with pytest.raises(WeightsFileError, match="cannot write .* directory .* does not exist"):
        save_torch_state_dict(state_dict, tmp_path / "absent" / "w.pth")
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors", "w.msgpack"])
def test_weights_files_are_readable_by_everyone(state_dict, arch, tmp_path, name):
    # Not secrets: 0644 like any file the user writes, not the 0600 of a temporary file.
    path = tmp_path / name
    if name.endswith(".msgpack"):
        save_flax_variables(torch_to_flax(state_dict, arch, WIDTH), path)
    else:
        save_torch_state_dict(state_dict, path)
    assert path.stat().st_mode & 0o777 == 0o644
