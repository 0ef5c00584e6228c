"""timm's layout (`timm.create_model("mobilenetv1_100" | "mobilenetv2_100" | ...)`, class EfficientNet).

    conv_stem / bn1                                   stem
    blocks.s.r.conv_dw + bn1, conv_pw + bn2            V1 block, and V2's first (no expansion)
    blocks.s.r.conv_pw + bn1, conv_dw + bn2, conv_pwl + bn3   V2's inverted residuals
    conv_head / bn2                                   head (V2; V1 only in mobilenetv1_100h)
    classifier                                        Linear

`s.r` is the block's stage and repeat in the paper's table: the depth multiplier of
`mobilenetv2_110d`/`_120d` shows in the repeats per stage, read from the keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import mobilenet_arch
from parity.layouts import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Layout,
    LayoutError,
    Preprocessing,
    Rule,
    Source,
    WeightsFileError,
    from_flax,
    head_rules,
    layer_rules,
    shape,
    v2_stride,
    torch_head,
    width_label,
)
from parity.layouts import torchvision as _torchvision

NAME = "timm"
EXPECTS = "conv_stem.weight, blocks.S.R.conv_dw.weight, classifier.weight (none with num_classes=0)"
CLASSIFIER = "classifier"
# The backbone's modules; the head is whatever linear layers follow on from them.
BACKBONE = ("conv_stem.", "bn1.", "blocks.", "conv_head.", "bn2.")


def recognise(keys) -> bool:
    """timm's keys; a LayoutError naming the model where they are another timm network's."""
    if not _timm_keys(keys):
        return False
    if other := other_model(keys):
        raise LayoutError(f"{other}, not MobileNetV1/V2")
    return True


def _timm_keys(keys) -> bool:
    keys = set(keys)
    return "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys)


def other_model(keys_or_weights) -> str | None:
    """What a timm checkpoint that is not a MobileNetV1/V2 holds, as far as its keys (and, given
    the weights, their shapes) tell."""
    keys = set(keys_or_weights)
    if not _timm_keys(keys):
        return None
    if any(".se." in k for k in keys):  # squeeze-excitation: MobileNetV3 and EfficientNet, not V1/V2
        if "conv_head.bias" in keys and "bn2.weight" not in keys:  # V3's head: a conv with bias, no BN
            # timm's arch_def: 7 stages for the large model, 6 for the small
            stages = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
            size = "large" if stages == 7 else "small"
            return f"a timm mobilenetv3_{size}_100 checkpoint (MobileNetV3-{size.capitalize()})"
        return "a timm EfficientNet-family checkpoint (squeeze-excitation blocks)"
    if isinstance(keys_or_weights, Mapping):
        kernels = sorted({np.shape(v)[-1] for k, v in keys_or_weights.items() if k.endswith(".conv_dw.weight")} - {3})
        if kernels:  # MobileNetV1/V2 are 3x3 throughout; timm builds its NAS networks in the same class
            sizes = ", ".join(f"{k}x{k}" for k in kernels)
            return f"a timm EfficientNet-family network with {sizes} depthwise kernels (efficientnet_lite*, mnasnet_*, spnasnet_100, fbnetc_100)"
    return None


def positions(weights: Mapping[str, Any]) -> list[tuple[int, int]]:
    found = sorted({(int(m[1]), int(m[2])) for k in weights if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))})
    depths: dict[int, int] = {}
    for stage, repeat in found:
        depths[stage] = depths.get(stage, 0) + 1
    return mobilenet_arch.stage_positions([depths[s] for s in sorted(depths)])


def architecture(weights: Mapping[str, Any], config=None, **kw) -> mobilenet_arch.Architecture:
    keys = set(weights)
    where = positions(weights)
    stem = shape(weights, "conv_stem.weight")[0]
    head = shape(weights, "conv_head.weight")[0] if "conv_head.weight" in keys else None
    head_kw = {k: kw.pop(k) for k in _torchvision.HEAD_OVERRIDES if k in kw}
    kw.setdefault("padding", "symmetric")
    kw.setdefault("bn_epsilon", mobilenet_arch.BN_EPSILON)
    if config is not None:  # a live timm model: its drop_rate
        kw.setdefault("dropout", float(config.get("drop_rate", 0.0)))
    arch = _backbone(weights, keys, where, stem, head, **kw)
    return mobilenet_arch.with_head(arch, read_head(weights, arch, config, dropout=kw.get("dropout", 0.0), **head_kw))


def read_head(weights: Mapping[str, Any], arch: mobilenet_arch.Architecture, config=None, **kw) -> mobilenet_arch.Head:
    """timm's `classifier` (a Linear; none after `num_classes=0` or `reset_classifier(0)`), or
    the Sequential a user put there, by shapes (`torch_head`) and, for a live model, as its
    modules say (`torchvision.live_head`). timm applies `drop_rate` before the classifier."""
    config = config or {}
    head = torch_head(
        weights, arch.num_features, lambda k: k.startswith(BACKBONE), CLASSIFIER,
        activation=kw.get("head_activation", "relu"), dropout=kw.get("dropout", 0.0),
    )
    read = _torchvision.live_head(head, head_names(head), config.get("live"), before=kw.get("dropout", 0.0))
    return _torchvision.noting_assumed(read, head, kw)


def head_names(head: mobilenet_arch.Head) -> tuple[str, ...]:
    """The head's state-dict prefixes: timm's `classifier` for a single layer the source did not
    name otherwise, else the source's names (or torchvision's Sequential numbering)."""
    if len(head.layers) == 1 and not head.layers[0].torch_name:
        return (CLASSIFIER,)
    return head.torch_names


def _backbone(weights, keys, where, stem, head, **kw) -> mobilenet_arch.Architecture:
    num_classes = 0  # the head is read apart (`read_head`)
    if any(".conv_pwl." in k for k in keys):
        specs = []
        for stage, repeat in where:
            p = f"blocks.{stage}.{repeat}."
            if p + "conv_pwl.weight" in keys:
                hidden, out = shape(weights, p + "conv_pw.weight")[0], shape(weights, p + "conv_pwl.weight")[0]
            else:
                hidden, out = None, shape(weights, p + "conv_pw.weight")[0]
            specs.append((hidden, out, v2_stride(stage, repeat), stage, repeat))
        if head is None:
            raise LayoutError("a timm MobileNetV2 without conv_head")
        kw.setdefault("width_mult", width_label(stem, specs[-1][1], 320))
        kw.setdefault("dropout", 0.0)
        return mobilenet_arch.mobilenet_v2_from_blocks(stem, specs, head, num_classes, **kw)
    if len(where) != sum(mobilenet_arch.V1_STAGE_DEPTHS):
        raise LayoutError(f"a timm MobileNetV1 with {len(where)} blocks: the paper's has {sum(mobilenet_arch.V1_STAGE_DEPTHS)}")
    outs = [shape(weights, f"blocks.{s}.{r}.conv_pw.weight")[0] for s, r in where]
    kw.setdefault("width_mult", width_label(stem, outs[-1], 1024))
    return mobilenet_arch.mobilenet_v1_from_channels(stem, outs, num_classes, head=head, **kw)


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    def names(index: int, block, layer) -> tuple[str, str]:
        if layer.role == "stem":
            return "conv_stem.weight", "bn1"
        if layer.role == "head":
            return "conv_head.weight", "bn2"
        p = f"blocks.{block.stage}.{block.repeat}."
        if block.layers[0].role != "expand":  # timm's DepthwiseSeparableConv: V1, and V2's first block
            conv, bn = {"depthwise": ("conv_dw", "bn1"), "pointwise": ("conv_pw", "bn2"), "project": ("conv_pw", "bn2")}[layer.role]
        else:
            conv, bn = {"expand": ("conv_pw", "bn1"), "depthwise": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")}[layer.role]
        return f"{p}{conv}.weight", p + bn

    return layer_rules(arch, names) + head_rules(arch, head_names(arch.head), "dense")


def preprocessing(config: Mapping[str, Any] | None = None, arch: mobilenet_arch.Architecture | None = None) -> Preprocessing:
    """From a timm `pretrained_cfg` where given (its test size and crop where it has them: the
    size the published accuracy is measured at); else the defaults of timm's MobileNet weights."""
    if config:
        size = (config.get("test_input_size") or config["input_size"])[-1]
        crop_pct = config.get("test_crop_pct") or config.get("crop_pct", 0.875)
        # timm data/transforms_factory.py: scale_size = floor(img_size / crop_pct)
        return Preprocessing(
            tuple(config["mean"]), tuple(config["std"]), int(size // crop_pct), int(size), config.get("interpolation", "bicubic")
        )
    if arch is not None and arch.arch == "v1":  # mobilenetv1_100.ra4_e3600_r224_in1k at its test size
        return Preprocessing(INCEPTION_MEAN, INCEPTION_STD, 269, 256, "bicubic")
    return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "bicubic")


def cannot_hold(arch: mobilenet_arch.Architecture) -> str | None:
    return _torchvision.state_dict_loses(NAME, arch, rules(_torchvision.as_written(arch)), architecture)


def of_model(model: Any) -> Source | None:
    """A live timm model: its preprocessing (`pretrained_cfg`), drop_rate, and its Sequentials
    (a classifier replaced by one: `torchvision.LiveHead`)."""
    if not hasattr(model, "pretrained_cfg") or not hasattr(model, "state_dict"):
        return None
    from parity import io

    live = {"drop_rate": getattr(model, "drop_rate", 0.0), "live": _torchvision.live_sequences(model)}
    return Source(io.to_numpy(model.state_dict()), live, dict(model.pretrained_cfg))


def read_directory(path: Path, ema: bool = False) -> Source | None:
    """A timm Hub repository (`push_to_hf_hub`): config.json with its `pretrained_cfg`, and
    model.safetensors (or pytorch_model.bin); None for another library's directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if "pretrained_cfg" not in config or "model_type" in config:
        return None
    from parity import io

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            weights = io.to_numpy(io.load_torch_state_dict(path / name))
            return Source(weights, {"drop_rate": 0.0}, {**config["pretrained_cfg"], "num_classes": config.get("num_classes")}, NAME, hub_labels(config))
    raise WeightsFileError(f"{path}: a timm model directory without model.safetensors or pytorch_model.bin")


def hub_labels(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names of a timm Hub repository's config.json: its own (`label_descriptions`, else
    `label_names`), else ImageNet-1k's descriptions (timm's `ImageNetInfo`) where its pretrained tag
    says it was trained there (`ra_in1k`, `e_in1k`, ...) and it has that many classes."""
    cfg = config.get("pretrained_cfg", {})
    for key in ("label_descriptions", "label_names"):
        names = config.get(key) or cfg.get(key)
        if isinstance(names, list) and names:
            return tuple(map(str, names))
    if str(cfg.get("tag", "")).endswith("in1k") and config.get("num_classes", cfg.get("num_classes")) == 1000:
        try:
            from timm.data import ImageNetInfo
        except ImportError:  # timm is an extra: without it, no names rather than no checkpoint
            return None
        return tuple(ImageNetInfo("imagenet-1k").label_descriptions())
    return None


def timm_model(architecture: mobilenet_arch.Architecture) -> Any:
    """The timm MobileNet whose state-dict shapes are `architecture`'s, or None (timm not installed,
    no model of its registry has its backbone's shapes, or a head timm's forward would not run)."""
    try:
        import timm
    except ImportError:
        return None
    backbone = mobilenet_arch.with_head(architecture, mobilenet_arch.Head())
    want = {r.key: tuple(r.from_flax(np.broadcast_to(np.float32(0), shape)).shape) for r, shape in _rule_shapes(backbone)}
    for name in timm.list_models(f"mobilenet{architecture.arch}_*"):
        model = timm.create_model(name, num_classes=0)
        have = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        if have == want:
            return _with_head(model, architecture.head)
    return None


def _with_head(model: Any, head: mobilenet_arch.Head) -> Any:
    """`model` with `head` where timm's forward runs it: its own Linear `classifier` for one
    layer, else a `classifier` Sequential holding the layers at the indices their written names
    give (`classifier.0`, `classifier.2`), each activation in the slot after its layer. None
    where the names are not such indices or leave an activation no slot."""
    import torch

    from torch_ref.models import DENSE_ACTIVATIONS

    if len(head.layers) <= 1:
        model.reset_classifier(head.num_classes)
        return model
    indices = [int(n[len(CLASSIFIER) + 1 :]) if re.fullmatch(rf"{CLASSIFIER}\.\d+", n) else None for n in head_names(head)]
    if None in indices:
        return None
    modules: list[Any] = [torch.nn.Identity() for _ in range(indices[-1] + 1)]  # Dropout's slots: identity in eval
    ins = [model.num_features] + [layer.units for layer in head.hidden]
    for index, layer, fan_in in zip(indices, head.layers, ins):
        modules[index] = torch.nn.Linear(fan_in, layer.units)
        if layer.activation:
            slot = index + 1
            if slot >= len(modules) or slot in indices:
                return None
            modules[slot] = DENSE_ACTIVATIONS[layer.activation]()
    model.classifier = torch.nn.Sequential(*modules)
    return model


def _rule_shapes(architecture):
    from parity.layouts import flax_shapes

    shapes = flax_shapes(architecture)
    return [(r, shapes[r.flax_path]) for r in rules(architecture)]


def run_timm(source: Any, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """timm itself, its model of these shapes filled with the converted weights."""
    model = timm_model(checkpoint.architecture)
    if model is None:
        return None
    import torch

    state = {k: torch.from_numpy(v) for k, v in from_flax(checkpoint.variables, rules(checkpoint.architecture)).items()}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return "timm", model.eval()(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()


def run_written(path: Path, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray] | None:
    """timm's model of these shapes, the file loaded into it strictly."""
    model = timm_model(checkpoint.architecture)
    if model is None:
        return None
    import torch

    from parity import io
    from parity.layouts import nchw

    model.load_state_dict(io.load_torch_state_dict(path), strict=True)
    with torch.no_grad():
        return "timm", model.eval()(nchw(images)).numpy()


LAYOUT = Layout(
    name=NAME,
    expects=EXPECTS,
    recognise=recognise,
    architecture=architecture,
    rules=rules,
    preprocessing=preprocessing,
    cannot_hold=cannot_hold,
    write=_torchvision.write_state_dict(rules),
    reads=("/",),
    read=read_directory,
    of_model=of_model,
    run_library=run_timm,
    run_written=run_written,
    overrides=("dropout", "padding", "bn_epsilon", *_torchvision.HEAD_OVERRIDES),
)
