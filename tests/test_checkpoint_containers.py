"""What training frameworks wrap the weights in, as they save it: Lightning's checkpoint dict with
its `model.` prefix, timm's train.py checkpoint with an EMA copy and its argparse arguments,
torchvision's reference scripts' `model` / `model_ema` (an AveragedModel: `module.` keys and
`n_averaged`), a MobileNet inside the user's own module. Each loads to the logits of the network
it wraps; what was left aside is named in a note."""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest
import torch
import torchvision

import parity
from parity import convert
from parity.models import relative_l2
from parity.random_weights import randomize_batchnorm
from tests.cli_errors import assert_one_line_error

timm = pytest.importorskip("timm")

# float32 rounding through ~50 layers: up to 1e-5 relative L2 measured (tests/test_layouts.py); a
# wrong set of weights (the EMA copy for the model, another prefix) is off by 1e-2 or more.
TOLERANCE = 1e-5
SIZE = 64  # any size exercises the same weights; small keeps the test cheap


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=5), seed).eval()


def gap(checkpoint, model: torch.nn.Module) -> float:
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    return relative_l2(np.asarray(checkpoint.model.apply(checkpoint.variables, x, train=False)), ref)


def perturb(model: torch.nn.Module) -> None:
    """A training step's worth of change: every parameter moved by 2% of itself (a relative move
    keeps the network as well conditioned as before, so float32 parity stays at its bound)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.02 * torch.randn_like(p))


def load_noting(source, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = parity.load(source, **kw)
    return ckpt, " ".join(str(w.message) for w in caught)


def holding(model, attribute: str) -> torch.nn.Module:
    """A user's module with the network as its `attribute`, so its keys start with `attribute.`."""
    module = torch.nn.Module()
    setattr(module, attribute, model)
    return module


def LitClassifier(model):
    """A LightningModule's shape: the network is its `model` attribute."""
    return holding(model, "model")


def test_lightning_checkpoint_loads_its_model_and_names_what_it_ignored(tmp_path):
    model = network(0)
    lit = LitClassifier(model)
    optimizer = torch.optim.AdamW(lit.parameters())
    torch.save(
        {"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.5.0", "state_dict": lit.state_dict(),
         "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [], "hyper_parameters": {"lr": 0.01, "num_classes": 5}},
        tmp_path / "epoch=3-step=30.ckpt.pth",
    )
    ckpt, notes = load_noting(tmp_path / "epoch=3-step=30.ckpt.pth")
    assert gap(ckpt, model) < TOLERANCE
    assert "'state_dict'" in notes and "optimizer_states" in notes and "hyper_parameters" in notes
    assert "'model.'" in notes


def timm_training_checkpoint(path):
    """As timm's train.py saves it (`CheckpointSaver`): the model, its EMA copy, the arguments."""
    model = timm.create_model("mobilenetv2_050", num_classes=5).eval()
    randomize_batchnorm(model, 1)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    perturb(model)
    ema.update(model)
    torch.save(
        {"epoch": 1, "arch": "mobilenetv2_050", "state_dict": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
         "version": 2, "args": argparse.Namespace(model="mobilenetv2_050", lr=0.1), "state_dict_ema": ema.module.state_dict(), "metric": 0.5},
        path,
    )
    return model, ema.module


def test_timm_checkpoint_reads_the_model_or_with_ema_its_ema_copy(tmp_path):
    model, ema_model = timm_training_checkpoint(tmp_path / "checkpoint-1.pth.tar.pth")
    ckpt, notes = load_noting(tmp_path / "checkpoint-1.pth.tar.pth")
    assert ckpt.layout == "timm"
    assert gap(ckpt, model) < TOLERANCE
    assert "EMA copy under 'state_dict_ema'" in notes and "ema=True" in notes
    ema_ckpt, _ = load_noting(tmp_path / "checkpoint-1.pth.tar.pth", ema=True)
    assert gap(ema_ckpt, ema_model) < TOLERANCE
    assert gap(ema_ckpt, model) > 100 * TOLERANCE  # the two copies differ: the choice is seen


def test_torchvision_reference_checkpoint_with_averaged_model_ema(tmp_path, capsys):
    # references/classification/train.py: {"model", "optimizer", "lr_scheduler", "epoch", "args",
    # "model_ema"}, its EMA an AveragedModel (keys under `module.`, and `n_averaged`).
    model = network(2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    ema.update_parameters(model)  # the first update copies
    perturb(model)
    ema.update_parameters(model)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 2, "args": argparse.Namespace(lr=0.1), "model_ema": ema.state_dict()}, tmp_path / "checkpoint.pth")
    assert convert.main([str(tmp_path / "checkpoint.pth"), str(tmp_path / "ema.msgpack"), "--ema"]) == 0
    out = capsys.readouterr().out
    assert "'model_ema'" in out and "'module.'" in out and "n_averaged" in out
    assert gap(parity.load(tmp_path / "ema.msgpack"), ema.module) < TOLERANCE
    assert gap(parity.load(tmp_path / "ema.msgpack"), model) > 100 * TOLERANCE  # the EMA, not the model


class Net(torch.nn.Module):
    """The user's own module around a MobileNet."""

    def __init__(self, backbone, extra: bool = False):
        super().__init__()
        self.net = torch.nn.Module()
        self.net.backbone = backbone
        if extra:
            self.aux = torch.nn.Linear(5, 2)


def test_a_mobilenet_inside_the_users_module_is_found_under_its_prefix(tmp_path):
    model = network(3)
    live, notes = load_noting(Net(model))
    assert gap(live, model) < TOLERANCE and "'net.backbone.'" in notes
    torch.save(Net(model).state_dict(), tmp_path / "net.pth")
    assert gap(parity.load(tmp_path / "net.pth"), model) < TOLERANCE


def test_a_state_dict_holding_more_than_a_mobilenet_says_what_else(tmp_path, capsys):
    torch.save(Net(network(4), extra=True).state_dict(), tmp_path / "more.pth")
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "more.pth"), str(tmp_path / "out.msgpack")])
    assert_one_line_error(capsys.readouterr().err, "under 'net.backbone.'", "aux.weight", "aux.bias")
    assert not (tmp_path / "out.msgpack").exists()


def test_ema_of_a_plain_state_dict_is_refused(tmp_path):
    torch.save(network(5).state_dict(), tmp_path / "plain.pth")
    with pytest.raises(parity.WeightsFileError, match="holds no EMA copy"):
        parity.load(tmp_path / "plain.pth", ema=True)


def test_a_text_file_named_pth_says_what_it_is_not(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "notes.pth"), str(tmp_path / "out.msgpack")])
    err = capsys.readouterr().err
    assert_one_line_error(err, "not a readable PyTorch checkpoint", "neither a zip archive")
    assert "pop from empty list" not in err


def test_an_attribute_named_like_transformers_prefix_is_still_found_as_torchvision(tmp_path):
    model = network(6)
    ckpt, notes = load_noting(holding(model, "mobilenet_v2"))  # transformers' prefix, as a user's attribute
    assert ckpt.layout == "torchvision" and gap(ckpt, model) < TOLERANCE and "'mobilenet_v2.'" in notes


def test_a_dict_of_numpy_arrays_loads_as_a_state_dict():
    model = network(7)
    assert gap(parity.load({k: v.numpy() for k, v in model.state_dict().items()}), model) < TOLERANCE


def test_ema_choices_that_cannot_be_met_say_so(tmp_path):
    sd = network(8).state_dict()
    torch.save({"model_ema": sd, "epoch": 3}, tmp_path / "ema_only.pth")
    with pytest.raises(parity.WeightsFileError, match="holds only an EMA copy of the weights, under 'model_ema': ema=True"):
        parity.load(tmp_path / "ema_only.pth")
    parity.save_torch_state_dict(sd, tmp_path / "w.safetensors")
    with pytest.raises(parity.WeightsFileError, match="plain state dict: it holds no EMA copy"):
        parity.load(tmp_path / "w.safetensors", ema=True)
    parity.save(parity.load(sd), tmp_path / "w.msgpack")
    with pytest.raises(parity.ConversionError, match="holds no EMA copy"):
        parity.load(tmp_path / "w.msgpack", ema=True)


def test_a_named_layout_still_strips_a_prefix_and_is_checked_against_the_keys(tmp_path):
    model = network(9)
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert gap(load_noting(ddp, layout="torchvision")[0], model) < TOLERANCE
    with pytest.raises(parity.ConversionError, match="these are torchvision weights, layout='timm' was asked for"):
        parity.load(ddp, layout="timm")


def test_lightning_checkpoint_with_an_ema_copy_reads_either_and_notes_the_other(tmp_path):
    # an EMA callback beside Lightning's own entries: both copies under the LightningModule's `model.`
    model, ema = network(10), network(10)
    perturb(model)
    torch.save(
        {"epoch": 3, "state_dict": LitClassifier(model).state_dict(), "state_dict_ema": LitClassifier(ema).state_dict(),
         "optimizer_states": [{}], "hyper_parameters": {"lr": 0.01}},
        tmp_path / "last.ckpt.pth",
    )
    ckpt, notes = load_noting(tmp_path / "last.ckpt.pth")
    assert gap(ckpt, model) < TOLERANCE
    assert "EMA copy under 'state_dict_ema'" in notes and "'model.'" in notes
    ema_ckpt, ema_notes = load_noting(tmp_path / "last.ckpt.pth", ema=True)
    assert gap(ema_ckpt, ema) < TOLERANCE and "'state_dict_ema'" in ema_notes
    assert gap(ema_ckpt, model) > 100 * TOLERANCE  # the two copies differ: the choice is seen


class RunsCode:
    """A pickle that would run a command when unpickled: it must never be."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_empty(path):
    path.write_bytes(b"")


def write_foreign_zip(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not weights")


def write_plain_pickle(path):
    import pickle

    path.write_bytes(pickle.dumps({"features.0.0.weight": RunsCode(path.with_suffix(".ran"))}))


def write_torch_pickle_with_code(path):
    torch.save({"features.0.0.weight": RunsCode(path.with_suffix(".ran"))}, path)


@pytest.mark.parametrize(
    "write, message",
    [
        (write_empty, "an empty file"),
        (write_foreign_zip, "a zip archive, but not one torch.save wrote"),
        (write_plain_pickle, "a pickle of another writer"),
        (write_torch_pickle_with_code, "holds Python objects other than tensors"),
    ],
)
def test_files_that_are_not_state_dicts_are_refused_in_one_line_without_running_code(write, message, tmp_path, capsys):
    write(tmp_path / "bad.pth")
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "bad.pth"), str(tmp_path / "out.msgpack")])
    err = capsys.readouterr().err
    assert_one_line_error(err, "bad.pth", message)
    assert "Weights only load failed" not in err and "Unsupported" not in err  # torch's own words
    assert not (tmp_path / "bad.ran").exists() and not (tmp_path / "out.msgpack").exists()
