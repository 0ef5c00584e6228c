"""torchvision's layout (and torch_ref's, which copies it): `features.i...`, `classifier.1`.

    features.0.0 / .1                      stem conv / BN
    features.i.conv.0.0 / .0.1 ...         a layer with an activation (Conv2dNormActivation)
    features.i.conv.k / .k+1               V2's linear projection: a bare conv and a bare BN
    features.N.0 / .1                      V2's head (and V1's, where it has one)
    classifier.1                           Linear (classifier.0 is Dropout)

The keys are written down once, on the description's layers (`ConvBN.torch_conv`, `torch_bn`):
the rules here only read them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import mobilenet_arch
from parity.layouts import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Layout,
    LayoutError,
    Preprocessing,
    Rule,
    Source,
    classes,
    head_rules,
    torch_head,
    from_flax,
    layer_rules,
    shape,
    v2_stride,
    what_is_lost,
)

NAME = "torchvision"
EXPECTS = "features.0.0.weight, features.N.conv.*, classifier.1.weight (none in a feature extractor)"
CLASSIFIER = "classifier.1"


def recognise(keys) -> bool:
    keys = set(keys)
    return "features.0.0.weight" in keys and "features.1.conv.0.0.weight" in keys


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    out = layer_rules(arch, lambda i, block, layer: (f"{layer.torch_conv}.weight", layer.torch_bn))
    return out + head_rules(arch, arch.head.torch_names, "dense")


def preprocessing(config: Preprocessing | None = None, arch=None) -> Preprocessing:
    """The weights enum's transforms where the source is one (`parity.hub`); else torchvision's
    IMAGENET1K_V1 transforms: resize 256, crop 224, bilinear."""
    return config if isinstance(config, Preprocessing) else Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "bilinear")


def parse_blocks(weights: Mapping[str, Any], conv_key, kernel_out) -> tuple[int, list[dict], int | None]:
    """Channels of a torchvision-numbered network: (stem, blocks, head).

    `conv_key(i, path)` names the conv kernel of `features.i.<path>` in the weights, or None where
    absent; `kernel_out(key)` reads its output channels. Each block is {"expand", "depthwise",
    "out", "v2"}.
    """
    indices = sorted({int(m[1]) for k in weights if (m := re.match(r"features[._](\d+)[._/]", k))})
    if not indices or indices[0] != 0 or indices != list(range(len(indices))):
        raise LayoutError(f"features blocks numbered {indices[:5]}...: expected 0, 1, 2, ... without gaps")
    stem_key = conv_key(0, ("0",))
    if stem_key is None:
        raise LayoutError("no stem convolution (features.0.0)")
    stem, blocks, head = kernel_out(stem_key), [], None
    for i in indices[1:]:
        single = conv_key(i, ("0",))
        if single is not None:  # a lone conv+BN: the head, last
            if i != indices[-1]:
                raise LayoutError(f"features.{i} is a single convolution but not the last block")
            head = kernel_out(single)
            break
        activated = []
        j = 0
        while (key := conv_key(i, ("conv", str(j), "0"))) is not None:
            activated.append(kernel_out(key))
            j += 1
        bare = conv_key(i, ("conv", str(j)))
        if bare is not None:  # V2: expand?, depthwise, then the linear projection
            if len(activated) not in (1, 2):
                raise LayoutError(f"features.{i}: {len(activated)} activated layers before the projection, expected 1 or 2")
            expand = activated[0] if len(activated) == 2 else None
            blocks.append({"v2": True, "expand": expand, "depthwise": activated[-1], "out": kernel_out(bare)})
        elif len(activated) == 2:  # V1: depthwise, pointwise
            blocks.append({"v2": False, "expand": None, "depthwise": activated[0], "out": activated[1]})
        else:
            raise LayoutError(f"features.{i}: neither a depthwise-separable nor an inverted-residual block")
    return stem, blocks, head


def build(stem: int, blocks: list[dict], head: int | None, num_classes: int, **kw) -> mobilenet_arch.Architecture:
    """The Architecture of torchvision-numbered channels, symmetric padding and eps 1e-5 unless
    `kw` says otherwise (the Flax layout reads its file's own description instead where it has one)."""
    kw.setdefault("padding", "symmetric")
    kw.setdefault("bn_epsilon", mobilenet_arch.BN_EPSILON)
    if any(b["v2"] for b in blocks):
        depths = _v2_depths([b["out"] for b in blocks])
        specs = [
            (b["expand"], b["out"], v2_stride(stage, repeat), stage, repeat)
            for b, (stage, repeat) in zip(blocks, mobilenet_arch.stage_positions(depths))
        ]
        if head is None:
            raise LayoutError("a MobileNetV2 without its head convolution (features.N.0)")
        kw.setdefault("dropout", mobilenet_arch.V2_DROPOUT)
        return mobilenet_arch.mobilenet_v2_from_blocks(stem, specs, head, num_classes, **kw)
    if len(blocks) != len(mobilenet_arch.V1_BLOCKS):
        raise LayoutError(f"a MobileNetV1 with {len(blocks)} blocks: the paper's has {len(mobilenet_arch.V1_BLOCKS)}")
    return mobilenet_arch.mobilenet_v1_from_channels(stem, [b["out"] for b in blocks], num_classes, head=head, **kw)


def _v2_depths(outs: list[int]) -> list[int]:
    """Repeats per stage: the paper's when there are 17 blocks; otherwise (a depth multiplier) the
    runs of equal output channels, which must then be 7, one per stage."""
    if len(outs) == sum(mobilenet_arch.V2_STAGE_DEPTHS):
        return list(mobilenet_arch.V2_STAGE_DEPTHS)
    runs = [1]
    for a, b in zip(outs, outs[1:]):
        if a == b:
            runs[-1] += 1
        else:
            runs.append(1)
    if len(runs) != len(mobilenet_arch.V2_STAGE_DEPTHS):
        raise LayoutError(f"{len(outs)} inverted residuals in {len(runs)} runs of equal channels: cannot tell the 7 stages apart")
    return runs


def architecture(weights: Mapping[str, Any], config=None, **kw) -> mobilenet_arch.Architecture:
    def conv_key(i, path):
        key = ".".join(("features", str(i), *path, "weight"))
        return key if key in weights and len(shape(weights, key)) == 4 else None

    stem, blocks, head = parse_blocks(weights, conv_key, lambda key: shape(weights, key)[0])
    arch = build(stem, blocks, head, 0, **{k: v for k, v in kw.items() if k not in HEAD_OVERRIDES})
    return _with_width(mobilenet_arch.with_head(arch, read_head(weights, arch, config, **kw)))


# What `parity.load` may say of a head a state dict cannot: the activation between its layers.
HEAD_OVERRIDES = ("head_activation",)


def read_head(weights: Mapping[str, Any], arch: mobilenet_arch.Architecture, config=None, **kw) -> mobilenet_arch.Head:
    """The head after `arch`'s backbone: a live module's own where `config` has it, else by shapes
    (`torch_head`), the dropout torchvision's (0.2 before the first layer) unless `kw` says."""
    if isinstance(config, mobilenet_arch.Head):
        return config
    default = mobilenet_arch.V2_DROPOUT if arch.arch == "v2" else 0.0
    return torch_head(
        weights, arch.num_features, lambda k: k.startswith("features."), CLASSIFIER,
        activation=kw.get("head_activation", "relu"), dropout=kw.get("dropout", default),
    )


def _with_width(arch: mobilenet_arch.Architecture) -> mobilenet_arch.Architecture:
    """Label the architecture with the torchvision width multiplier that gives its channels, when one
    does (candidates read from the channels themselves, so any width is found)."""
    width = infer_width(arch)
    if width is None:
        return arch
    import dataclasses

    return dataclasses.replace(arch, width_mult=width)


# The published widths, tried first as labels; any other is found from the channels' ratios.
KNOWN_WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 1.5, 2.0)


def expected_shapes(arch: mobilenet_arch.Architecture) -> dict[str, tuple[int, ...]]:
    """PyTorch shape of every weight the model has, from the description alone."""
    shapes = {}
    for block in arch.blocks:
        for layer in block.layers:
            k = layer.kernel_size
            shapes[f"{layer.torch_conv}.weight"] = (layer.out_channels, layer.in_channels // layer.groups, k, k)
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{layer.torch_bn}.{name}"] = (layer.out_channels,)
    for name, (fan_in, units) in zip(arch.head.torch_names, mobilenet_arch.dense_shapes(arch)):
        shapes[f"{name}.weight"] = (units, fan_in)
        shapes[f"{name}.bias"] = (units,)
    return shapes


def infer_width(arch: mobilenet_arch.Architecture) -> float | None:
    """The width multiplier whose torchvision architecture has `arch`'s shapes, or None."""
    if arch.arch == "v1":
        bases = [mobilenet_arch.V1_STEM_CHANNELS] + [c for c, _ in mobilenet_arch.V1_BLOCKS]
    else:
        bases = [mobilenet_arch.V2_STEM_CHANNELS] + [c for _, c, n, _ in mobilenet_arch.V2_BLOCKS for _ in range(n)]
    outs = [block.out_channels for block in arch.blocks]
    candidates = [round(c / b, 4) for c, b in zip(outs, bases)] + list(KNOWN_WIDTHS)
    want = expected_shapes(arch)
    has_head = arch.arch == "v1" and arch.blocks[-1].layers[0].role == "head"
    for width in sorted(set(candidates), key=candidates.index):
        if width <= 0 or has_head:
            continue
        try:
            candidate = mobilenet_arch.with_head(mobilenet_arch.architecture(arch.arch, width), arch.head)
        except ValueError:
            continue
        if expected_shapes(candidate) == want:
            return width
    return None


def cannot_hold(arch: mobilenet_arch.Architecture) -> str | None:
    return what_is_lost(NAME, arch, rules(arch), architecture)


# ---------------------------------------------------------------- PyTorch files and models

# The files a PyTorch state dict is saved as; the layout inside is recognised from the keys.
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def read_torch_file(path: Path, ema: bool = False) -> Source:
    from parity import io

    return Source(io.to_numpy(io.load_torch_state_dict(path, ema)))


def write_state_dict(rules_of):
    """A layout's `write` for a PyTorch state dict keyed by `rules_of(architecture)`, with the BN
    step counters PyTorch's models hold."""

    def write(checkpoint, path: Path, num_batches_tracked: int = 0, extra=None) -> None:
        import torch

        from parity import io

        tensors = from_flax(checkpoint.variables, rules_of(checkpoint.architecture))
        state_dict = {k: torch.from_numpy(v) for k, v in tensors.items()}
        for key in tensors:
            if key.endswith(".running_var"):
                state_dict[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
        io.save_torch_state_dict(state_dict, path)

    return write


def of_model(model: Any) -> Source | None:
    """Any other torch module (torchvision's, torch_ref's): its state dict, the layout recognised."""
    if not hasattr(model, "state_dict"):
        return None
    from parity import io

    return Source(io.to_numpy(model.state_dict()))


def torch_ref_model(checkpoint):
    """torch_ref's model of the checkpoint's architecture (any padding, any epsilon) holding its
    weights, in eval mode."""
    import torch

    import torch_ref

    model = torch_ref.MobileNet(checkpoint.architecture)
    state = {k: torch.from_numpy(v) for k, v in from_flax(checkpoint.variables, rules(checkpoint.architecture)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval()


def run_torch_ref(source: Any, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray]:
    """torch_ref, which has torchvision's semantics and any padding, on the converted weights."""
    import torch

    with torch.no_grad():
        return "torch_ref", torch_ref_model(checkpoint)(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()


def run_written(path: Path, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray]:
    """The file loaded strictly into torchvision's own mobilenet_v2 where it builds these shapes
    (V2 at a torchvision width), else into torch_ref's model."""
    import torch

    from parity import io
    from parity.layouts import nchw

    arch = checkpoint.architecture
    state = io.load_torch_state_dict(path)
    model, library = None, "torch_ref"
    if arch.arch == "v2" and infer_width(arch) is not None and arch.num_classes:
        import torchvision

        model, library = torchvision.models.mobilenet_v2(num_classes=arch.num_classes, width_mult=infer_width(arch)), "torchvision"
    if model is None:
        import torch_ref

        model = torch_ref.MobileNet(arch)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return library, model.eval()(nchw(images)).numpy()


LAYOUT = Layout(
    name=NAME,
    expects=EXPECTS,
    recognise=recognise,
    architecture=architecture,
    rules=rules,
    preprocessing=preprocessing,
    cannot_hold=cannot_hold,
    write=write_state_dict(rules),
    writes=lambda path: path.name.lower().endswith(TORCH_SUFFIXES),
    reads=TORCH_SUFFIXES,
    read=read_torch_file,
    of_model=of_model,
    run_library=run_torch_ref,
    run_written=run_written,
)
