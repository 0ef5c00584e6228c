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

import dataclasses
import functools
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


def features_elsewhere(weights: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(prefix, the weights keyed as torchvision's) where torchvision's `features` Sequential was
    saved under another name: `model.features.state_dict()` (no prefix at all), or a user's
    module holding it as `self.backbone = mobilenet_v2().features` beside its own head
    (`backbone.0.0.weight`, `head.0.weight`). Only the numbered blocks move; the rest (the head,
    read by shapes) keeps its names. None where no such Sequential is found."""
    for key in weights:
        if not key.endswith("0.0.weight") or (prefix := key[: -len("0.0.weight")]).endswith("features."):
            continue
        if prefix and not prefix.endswith("."):
            continue
        if f"{prefix}1.conv.0.0.weight" not in weights:
            continue
        numbered = re.compile(re.escape(prefix) + r"\d+\.")
        moved = {("features." + k[len(prefix):] if numbered.match(k) else k): v for k, v in weights.items()}
        if len(moved) == len(weights) and recognise(moved):
            return prefix, moved
    return None


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    out = layer_rules(arch, lambda i, block, layer: (f"{layer.torch_conv}.weight", layer.torch_bn))
    return out + head_rules(arch, arch.head.torch_names, "dense")


def as_written(arch: mobilenet_arch.Architecture) -> mobilenet_arch.Architecture:
    """`arch` with the head's names a written state dict gives it: the source's for a head of
    several layers (the recipe's `classifier.1`/`.3`, a user's `head.0`/`.2`), so the file loads
    strictly into the model it came from; the library's own for a single layer, whatever the
    source called it."""
    if len(arch.head.layers) != 1 or not arch.head.layers[0].torch_name:
        return arch
    plain = dataclasses.replace(arch.head.layers[0], torch_name="")
    return mobilenet_arch.with_head(arch, dataclasses.replace(arch.head, layers=(plain,)))


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


def add_head_activation_flag(parser) -> None:
    """`--head-activation`, for the tools that read a state dict (convert, export)."""
    parser.add_argument(
        "--head-activation", choices=mobilenet_arch.DENSE_ACTIVATIONS,
        help="the activation between a PyTorch state dict's head layers, which the file does not hold (default: relu)",
    )


def head_activation_override(args) -> dict[str, str]:
    """`parity.load`'s override from `--head-activation`, where it was given."""
    return {"head_activation": args.head_activation} if args.head_activation else {}


def read_head(weights: Mapping[str, Any], arch: mobilenet_arch.Architecture, config=None, **kw) -> mobilenet_arch.Head:
    """The head after `arch`'s backbone: a live module's own where `config` has it, else by shapes
    (`torch_head`), the dropout torchvision's (0.2 before the first layer) unless `kw` says; a live
    module's Sequential (`LiveHead`) then says the activations and dropouts it really holds."""
    if isinstance(config, mobilenet_arch.Head):  # torch_ref's module: its description says it
        return config if "dropout" not in kw else mobilenet_arch.with_dropout(mobilenet_arch.with_head(arch, config), kw["dropout"]).head
    default = mobilenet_arch.V2_DROPOUT if arch.arch == "v2" else 0.0
    head = torch_head(
        weights, arch.num_features, lambda k: k.startswith("features."), CLASSIFIER,
        activation=kw.get("head_activation", "relu"), dropout=kw.get("dropout", default),
    )
    return noting_assumed(live_head(head, [layer.torch_name or CLASSIFIER for layer in head.layers], config, before=0.0), head, kw)


def noting_assumed(read: mobilenet_arch.Head, by_shapes: mobilenet_arch.Head, kw) -> mobilenet_arch.Head:
    """`read`, with a note where its hidden activations are the assumed ReLU: no live module said
    them (`read` is still the head read by shapes) and no `head_activation` was given. A wrong
    assumption is invisible to every check (each library's model is then built with it too)."""
    if read is by_shapes and read.hidden and "head_activation" not in kw:
        import warnings

        warnings.warn(
            "a state dict holds no activations: ReLU is assumed between the head's layers; "
            "head_activation= (--head-activation) names the one the model used",
            stacklevel=4,
        )
    return read


# ---------------------------------------------------------------- a live module's head

@functools.cache
def live_activations() -> dict[str, str]:
    """The activation modules a live head is read from, by class name -> the head's activation:
    torch_ref's table read backwards (imported here: torch only when a live module is read)."""
    from torch_ref.models import DENSE_ACTIVATIONS

    return {cls.__name__: name for name, cls in DENSE_ACTIVATIONS.items()}


LIVE_PASSTHROUGH = ("Identity", "Flatten")


@dataclasses.dataclass(frozen=True)
class LiveHead:
    """What a live module says of its head that its state dict cannot: the children of each of
    its `nn.Sequential`s holding a Linear, in order, as (dotted name, kind, value): kind "linear",
    "dropout" (p), "activation" (its `Head` name), "softmax", "skip" (Identity, Flatten) or
    "other" (the class, named in an error)."""

    sequences: Mapping[str, tuple[tuple[str, str, Any], ...]]


def live_sequences(model: Any) -> LiveHead:
    import torch

    sequences = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential) and any(isinstance(c, torch.nn.Linear) for c in module.children()):
            sequences[name] = tuple((f"{name}.{child}" if name else child, *_kind(m)) for child, m in module.named_children())
    return LiveHead(sequences)


def _kind(module: Any) -> tuple[str, Any]:
    kind = type(module).__name__
    if kind == "GELU" and getattr(module, "approximate", "none") != "none":
        return "other", f"GELU(approximate={module.approximate!r})"  # the Flax head's GELU is the exact one
    if kind in live_activations():
        return "activation", live_activations()[kind]
    if kind.startswith("Dropout"):
        return "dropout", float(module.p)
    if kind == "Linear":
        return "linear", None
    if kind == "Softmax":
        return "softmax", None
    if kind in LIVE_PASSTHROUGH:
        return "skip", None
    return "other", kind


def live_head(head: mobilenet_arch.Head, names: list[str], live: Any, before: float = 0.0) -> mobilenet_arch.Head:
    """`head` (read by shapes, its layers at `names` in the state dict) with the activations,
    dropouts and softmax the live module's Sequential holding those layers has in order; `before`
    the dropout the model's forward applies ahead of the Sequential (timm's drop_rate). Unchanged
    where `live` is not a `LiveHead` or no one Sequential holds every layer (the module's forward
    then applies what it applies, which no module says)."""
    if not isinstance(live, LiveHead) or not head.layers:
        return head
    parents = {name.rpartition(".")[0] for name in names}
    if len(parents) != 1:
        return head
    (parent,) = parents
    # The live names may carry the prefix the state dict was found under (`net.backbone.`).
    found = [s for s in live.sequences if s == parent or s.endswith("." + parent)]
    if len(found) != 1:
        return head
    sequence = live.sequences[found[0]]
    strip = len(found[0]) - len(parent)
    layers, index, dropout, output = list(head.layers), -1, None, "none"
    for name, kind, value in sequence:
        name = name[strip:]
        if kind == "linear":
            if name not in names or names.index(name) != index + 1:
                return head  # a Linear of another head: nothing to say of this one's order
            index += 1
            first = before if index == 0 else 0.0
            layers[index] = dataclasses.replace(layers[index], dropout=first if dropout is None else dropout, activation=None)
            dropout = None
        elif kind == "dropout":
            dropout = value
        elif kind == "activation":
            if index < 0 or layers[index].activation is not None:
                where = "before the first linear layer" if index < 0 else f"a second one after {names[index]}"
                raise LayoutError(f"{name}: an activation {where}: a MobileNet head applies one activation after a linear layer")
            layers[index] = dataclasses.replace(layers[index], activation=value)
        elif kind == "softmax":
            if index != len(layers) - 1:
                raise LayoutError(f"{name}: a Softmax before the last linear layer: only the output may be one")
            output = "softmax"
        elif kind == "other":
            raise LayoutError(
                f"{name}: a {value} in the head: a MobileNet head reads only Linear, Dropout, Softmax and the activations "
                f"{', '.join(live_activations())}"
            )
    return mobilenet_arch.check_head(mobilenet_arch.Head(tuple(layers), output))


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
    return state_dict_loses(NAME, arch, rules(as_written(arch)), architecture)


def state_dict_loses(layout: str, arch: mobilenet_arch.Architecture, rules_: list[Rule], architecture_) -> str | None:
    """What a PyTorch state dict of `layout` cannot hold of `arch` (`what_is_lost`). It holds no
    activations: a head whose hidden layers share one is read back with it named
    (`head_activation=`, `--head-activation`); one mixing several, or with an activation after
    its output layer, cannot be."""
    hidden = {layer.activation for layer in arch.head.hidden}
    if len(hidden) > 1 or None in hidden:
        return f"a {layout} state dict holds no activations: the head's hidden layers ({arch.head.describe()}) are read back with one activation for all"
    if arch.head.layers and arch.head.layers[-1].activation:
        return f"a {layout} state dict holds no activations: the {arch.head.layers[-1].activation} after the head's output layer would be lost"
    override = {"head_activation": hidden.pop()} if hidden else {}
    return what_is_lost(layout, arch, rules_, functools.partial(architecture_, **override))


# ---------------------------------------------------------------- PyTorch files and models

# The files a PyTorch state dict is saved as; the layout inside is recognised from the keys.
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def read_torch_file(path: Path, ema: bool = False) -> Source:
    from parity import io

    return Source(io.to_numpy(io.load_torch_state_dict(path, ema)))


def write_state_dict(rules_of):
    """A layout's `write` for a PyTorch state dict keyed by `rules_of(architecture)`, the head
    named `as_written`, with the BN step counters PyTorch's models hold."""

    def write(checkpoint, path: Path, num_batches_tracked: int = 0, extra=None) -> None:
        import torch

        from parity import io

        tensors = from_flax(checkpoint.variables, rules_of(as_written(checkpoint.architecture)))
        state_dict = {k: torch.from_numpy(v) for k, v in tensors.items()}
        for key in tensors:
            if key.endswith(".running_var"):
                state_dict[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
        io.save_torch_state_dict(state_dict, path)

    return write


def of_model(model: Any) -> Source | None:
    """Any other torch module (torchvision's, torch_ref's, a user's): its state dict, the layout
    recognised, and its Sequentials (`LiveHead`), which say the head's activations and dropouts."""
    if not hasattr(model, "state_dict"):
        return None
    from parity import io

    if isinstance(getattr(model, "architecture", None), mobilenet_arch.Architecture):
        # torch_ref's module: its own description says the head, under whatever names it holds it.
        return Source(io.to_numpy(model.state_dict()), model.architecture.head)
    live = live_sequences(model) if hasattr(model, "named_modules") else None
    return Source(io.to_numpy(model.state_dict()), live)


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

    arch = as_written(checkpoint.architecture)
    state = io.load_torch_state_dict(path)
    model, library = None, "torch_ref"
    if arch.arch == "v2" and infer_width(arch) is not None and len(arch.head.layers) == 1:
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
    overrides=("dropout", "padding", "bn_epsilon", *HEAD_OVERRIDES),
)
