"""Any MobileNet checkpoint in, any layout out.

    ckpt = parity.load("mobilenetv2_100.pth")          # or a HF directory, .keras, .msgpack, a live model
    ckpt.model.apply(ckpt.variables, images)            # images as ckpt.preprocessing says
    parity.save(ckpt, "out_dir", layout="hf")           # torchvision, timm, hf, keras or flax (.msgpack)
    torch_model = parity.load_torch("model.msgpack")    # a torch_ref module

The layout, architecture, width, depth, classes and padding are read from the weights (and the
config the source has: a HF config.json, a .keras config, timm's pretrained_cfg); an override
that disagrees with them is an error naming both.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import flax_mobilenet
import mobilenet_arch
from parity.layouts import ConversionError, LayoutError, Preprocessing, from_flax, short_list, to_flax
from parity.layouts import flax as flax_layout
from parity.layouts import hf, keras, timm, torchvision
from parity.layouts.detect import LAYOUTS, recognise, strip_module_prefix

# Which layout a file's name asks for when writing.
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
KERAS_SUFFIXES = (".keras", ".h5")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    model: Any  # a flax_mobilenet.MobileNet
    variables: dict  # {"params", "batch_stats"} of jax arrays on the default device
    architecture: mobilenet_arch.Architecture
    preprocessing: Preprocessing
    layout: str  # where the weights came from: torchvision, timm, hf, keras or flax


# ---------------------------------------------------------------- reading


def load(source: Any, **overrides) -> Checkpoint:
    """A Checkpoint from a file, a HF model directory, a state dict, Flax variables, or a live
    torchvision/torch_ref, timm, transformers or keras model.

    `overrides`: `arch`, `width_mult`, `num_classes` are checked against the weights; `dropout`,
    `padding`, `bn_epsilon` replace what the source says (a bare state dict cannot say them);
    `layout` names the layout instead of recognising it; `preprocessing` replaces the source's.
    """
    overrides = dict(overrides)
    if "width" in overrides:
        overrides["width_mult"] = overrides.pop("width")
    weights, config, preprocessing_config, layout = _read(source)
    if overrides.get("layout") and layout != "flax" and overrides["layout"] != layout and layout is not None:
        raise ConversionError(f"these are {layout} weights, layout={overrides['layout']!r} was asked for")
    if layout is None:
        layout = overrides.get("layout") or recognise(weights)
    weights = strip_module_prefix(weights)
    kw = {k: overrides[k] for k in ("dropout", "padding", "bn_epsilon") if k in overrides}
    if layout == "flax":
        arch = config or flax_layout.architecture(weights)
        if kw:
            arch = _rebuilt(arch, **kw)
        rules = flax_layout.rules(arch)
        pre = preprocessing_config or flax_layout.preprocessing()
    else:
        module = LAYOUTS[layout]
        if layout == "keras" or layout == "hf" or layout == "timm":
            arch = module.architecture(weights, config, **kw)
        else:
            arch = module.architecture(weights, **kw)
        rules = module.rules(arch)
        pre = module.preprocessing(preprocessing_config) if layout != "timm" else module.preprocessing(preprocessing_config, arch.arch)
    arch = _check_overrides(arch, overrides)
    variables = _convert(weights, rules, arch, layout)
    if isinstance(overrides.get("preprocessing"), Preprocessing):
        pre = overrides["preprocessing"]
    return Checkpoint(flax_mobilenet.MobileNet(arch), variables, arch, pre, layout)


def _read(source: Any) -> tuple[Mapping[str, Any], Any, Any, str | None]:
    """(weights, config, preprocessing config, layout or None to recognise)."""
    from parity import io

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            state_dict, config, pre = io.read_hf_directory(path)
            return _numpy(state_dict), config, pre, None
        if not path.is_file():
            raise io.WeightsFileError(f"{path}: no such file or directory")
        if path.suffix.lower() == ".msgpack":
            variables = io.load_flax_variables(path)
            arch, pre = io.read_description(path)
            return variables, arch, pre, "flax"
        if path.suffix.lower() in KERAS_SUFFIXES:
            weights, config = keras.read_file(path)
            return weights, config, None, None
        if path.suffix.lower() in TORCH_SUFFIXES:
            return _numpy(io.load_torch_state_dict(path)), None, None, None
        raise io.WeightsFileError(
            f"{path}: unknown extension {path.suffix or '(none)'!r}: expected .pth, .pt, .bin, .safetensors, .msgpack, .keras, .h5 or a Hugging Face directory"
        )
    if isinstance(source, Checkpoint):
        return source.variables, source.architecture, source.preprocessing, "flax"
    if isinstance(source, Mapping):
        if "params" in source and "batch_stats" in source:
            return source, None, None, "flax"
        return _numpy(source), None, None, None
    return _read_model(source)


def _read_model(model: Any) -> tuple[Mapping[str, Any], Any, Any, str | None]:
    """A live model: its weights and the configuration it carries."""
    if hasattr(model, "weights") and hasattr(model, "layers") and not hasattr(model, "state_dict"):
        weights, config = keras.of_model(model)
        return weights, config, None, "keras"
    if not hasattr(model, "state_dict"):
        raise LayoutError(f"a {type(model).__name__}: expected a file, a directory, a state dict or a torchvision, timm, transformers or keras model")
    weights = _numpy(model.state_dict())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # transformers
        return weights, config.to_dict(), None, None
    if hasattr(model, "pretrained_cfg"):  # timm: its preprocessing, and drop_rate
        return weights, {"drop_rate": getattr(model, "drop_rate", 0.0)}, dict(model.pretrained_cfg), None
    return weights, None, None, None


def _numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from parity.weights import _to_numpy

    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _rebuilt(arch: mobilenet_arch.Architecture, **kw) -> mobilenet_arch.Architecture:
    """`arch` with another dropout, padding or epsilon."""
    if "padding" in kw:
        pad = kw["padding"]
        blocks = tuple(
            dataclasses.replace(b, layers=tuple(dataclasses.replace(l, pad=pad) for l in b.layers)) for b in arch.blocks
        )
        arch = dataclasses.replace(arch, blocks=blocks)
    if "bn_epsilon" in kw:
        arch = dataclasses.replace(arch, bn_epsilon=kw["bn_epsilon"])
    if "dropout" in kw:
        arch = dataclasses.replace(arch, dropout=kw["dropout"])
    return arch


def _check_overrides(arch: mobilenet_arch.Architecture, overrides: Mapping[str, Any]) -> mobilenet_arch.Architecture:
    if "arch" in overrides and overrides["arch"] != arch.arch:
        raise ConversionError(
            f"these weights are MobileNet{arch.arch.upper()} width {arch.width_mult:g}, not MobileNet{overrides['arch'].upper()}: "
            f"use arch={arch.arch!r} (--arch {arch.arch})"
        )
    if "num_classes" in overrides and overrides["num_classes"] != arch.num_classes:
        raise ConversionError(f"these weights have {arch.num_classes} classes, num_classes={overrides['num_classes']} was asked for")
    width = overrides.get("width_mult")
    if width is not None and abs(width - arch.width_mult) > 1e-6:
        try:
            same = _channels(mobilenet_arch.architecture(arch.arch, width, arch.num_classes)) == _channels(arch)
        except ValueError:
            same = False
        if not same:
            raise ConversionError(
                f"these weights have width {arch.width_mult:g} (stem {arch.blocks[0].out_channels}, "
                f"{arch.num_features} features), width_mult={width:g} was asked for: use width_mult={arch.width_mult:g} (--width {arch.width_mult:g})"
            )
        arch = dataclasses.replace(arch, width_mult=width)
    return arch


def _channels(arch: mobilenet_arch.Architecture) -> list[int]:
    return [layer.out_channels for block in arch.blocks for layer in block.layers]


def _convert(weights: Mapping[str, Any], rules, arch: mobilenet_arch.Architecture, layout: str) -> dict:
    """Flax variables through `rules`, every key used and every shape the model's."""
    import jax

    if layout == "flax":
        flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(dict(weights))[0]}
    else:
        flat = weights
    used = {r.key for r in rules}
    missing = [r.key for r in rules if r.key not in flat]
    extra = [k for k in flat if k not in used and not k.endswith("num_batches_tracked")]
    if missing or extra:
        parts = [f"{len(missing)} missing keys: {short_list(missing)}"] if missing else []
        parts += [f"{len(extra)} unexpected keys: {short_list(extra)}"] if extra else []
        raise LayoutError(f"{layout} weights of MobileNet{arch.arch.upper()}: " + "; ".join(parts))
    variables = to_flax({k: np.asarray(v) for k, v in flat.items() if k in used}, rules)
    expected = jax.eval_shape(lambda: flax_mobilenet.MobileNet(arch).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
    for rule in rules:
        node_e, node_v = expected, variables
        for name in rule.flax_path:
            node_e, node_v = node_e[name], node_v[name]
        if tuple(node_v.shape) != tuple(node_e.shape):
            raise LayoutError(f"{layout} weights: {rule.key} has shape {np.shape(flat[rule.key])}, which does not fit the other layers ({'/'.join(rule.flax_path)} {tuple(node_e.shape)} expected)")
    # On the device once: numpy leaves would be copied there at every call of a jitted apply
    # (2-3 ms a call for V2's 14 MB on this CPU, a quarter of batch 1's latency).
    return jax.device_put(variables)


def load_torch(source: Any, **overrides):
    """`source` as a torch_ref module in eval mode (it pads and normalises as the source does)."""
    import torch

    import torch_ref

    ckpt = source if isinstance(source, Checkpoint) and not overrides else load(source, **overrides)
    model = torch_ref.MobileNet(ckpt.architecture)
    state = {k: torch.from_numpy(v) for k, v in from_flax(ckpt.variables, torchvision.rules(ckpt.architecture)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval()


# ---------------------------------------------------------------- writing


def layout_for_path(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".msgpack"):
        return "flax"
    if name.endswith(".keras") or name.endswith(".weights.h5"):
        return "keras"
    if name.endswith(TORCH_SUFFIXES):
        return "torchvision"
    if not path.suffix:
        return "hf"
    raise LayoutError(
        f"{path}: unknown extension {path.suffix!r}: expected .msgpack, .pth, .pt, .safetensors, .keras, .weights.h5 "
        "or a directory (Hugging Face), or name the layout (--layout)"
    )


def save(
    checkpoint: Checkpoint, path: str | os.PathLike, layout: str | None = None, num_batches_tracked: int = 0, extra: Mapping[str, Any] | None = None
) -> None:
    """Write `checkpoint` in `layout` (default: from the name: .msgpack flax, .pth/.safetensors
    torchvision, .keras/.weights.h5 keras, a directory hf). A layout that cannot express the
    architecture (TensorFlow padding as torchvision, symmetric padding as Keras) is a LayoutError.
    `extra`: further keys for a .msgpack's description (a training run's class names); the other
    layouts have no place for them."""
    from parity import io

    path = Path(path)
    layout = layout or layout_for_path(path)
    arch, variables = checkpoint.architecture, checkpoint.variables
    if layout == "flax":
        io.save_flax_variables(variables, path, architecture=arch, preprocessing=checkpoint.preprocessing, extra=extra)
    elif layout in ("torchvision", "timm"):
        module = LAYOUTS[layout]
        tensors = from_flax(variables, module.rules(arch))
        _check_expressible(layout, arch, module.architecture({k: v for k, v in tensors.items()}, **({"config": None} if layout == "timm" else {})))
        import torch

        state_dict = {k: torch.from_numpy(v) for k, v in tensors.items()}
        for key in tensors:
            if key.endswith(".running_var"):
                state_dict[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
        io.save_torch_state_dict(state_dict, path)
    elif layout == "hf":
        if path.suffix:
            raise LayoutError(f"{path}: a Hugging Face checkpoint is a directory (config.json, model.safetensors, preprocessor_config.json)")
        hf.write_directory(arch, variables, path, checkpoint.preprocessing)
    elif layout == "keras":
        keras.write_file(arch, variables, path)
    else:
        raise LayoutError(f"unknown layout {layout!r}: expected torchvision, timm, hf, keras or flax")


def _check_expressible(layout: str, arch: mobilenet_arch.Architecture, reread: mobilenet_arch.Architecture) -> None:
    """What `layout`'s keys cannot say (padding, epsilon, a residual) would be lost: refuse."""
    if hf.same_architecture(arch, reread):
        return
    pads = sorted({str(l.pad) for b in arch.blocks for l in b.layers})
    if pads != ["symmetric"]:
        raise LayoutError(f"{layout}'s models pad symmetrically, these weights pad {', '.join(pads)}: save them as hf, keras or .msgpack")
    if arch.bn_epsilon != reread.bn_epsilon:
        raise LayoutError(f"{layout}'s models use BatchNorm epsilon {reread.bn_epsilon:g}, these weights {arch.bn_epsilon:g}: save them as hf, keras or .msgpack")
    raise LayoutError(f"{layout}'s layout cannot express this architecture (its residual connections differ): save it as .msgpack")


def describe(arch: mobilenet_arch.Architecture) -> str:
    pads = sorted({str(l.pad) for b in arch.blocks for l in b.layers if l.kernel_size > 1})
    depth = "" if arch.arch == "v1" or list(arch.stage_depths) == list(torchvision.V2_DEPTHS) else f", depth {list(arch.stage_depths)}"
    return (
        f"MobileNet{arch.arch.upper()} width {arch.width_mult:g}{depth}, {arch.num_classes} classes, "
        f"padding {'/'.join(pads)}, BatchNorm epsilon {arch.bn_epsilon:g}"
    )


# ---------------------------------------------------------------- the description as JSON
