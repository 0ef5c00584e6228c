"""This project's own layout: Flax variables `{"params", "batch_stats"}` at
`features_i/<role>/{conv/kernel, bn/...}` and `classifier`, in a `.msgpack` file
(`flax.serialization`). Files written by `parity` carry their architecture and preprocessing beside
them (`<file>.json`); for older files the channels are read from the shapes and the rest is
torchvision's (symmetric padding, epsilon 1e-5).

Keys are the Flax paths joined by "/" (`params/features_0/stem/conv/kernel`), so the rules are the
identity.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

import mobilenet_arch
from parity.layouts import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Layout,
    LayoutError,
    Preprocessing,
    Rule,
    Source,
    WeightsFileError,
    flat_variables,
    layer_rules,
    rebuilt,
)
from parity.layouts import torchvision as _torchvision
from toolkit.cli import first_line

NAME = "flax"
SUFFIX = ".msgpack"


def recognise(weights: Mapping[str, Any]) -> bool:
    return any(k.startswith("params/") for k in weights) and any(k.startswith("batch_stats/") for k in weights)


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    """Identity rules: the key is the Flax path itself."""
    out = layer_rules(arch, lambda i, block, layer: (f"params/{block.name}/{layer.role}/conv/kernel", ""), conv="same", depthwise="same")
    out = [Rule("/".join(r.flax_path), r.flax_path, "same") for r in out]
    for name in arch.head.flax_names:
        for leaf in ("kernel", "bias"):
            path = ("params", name, leaf)
            out.append(Rule("/".join(path), path, "same"))
    return out


def architecture(weights: Mapping[str, Any], config: mobilenet_arch.Architecture | None = None, **kw) -> mobilenet_arch.Architecture:
    """The architecture of the file's description (`config`) where it has one; else the
    torchvision-style architecture whose Flax variables have these shapes."""
    if config is not None:
        return rebuilt(config, **kw)
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in weights.items()}).get("params", {})
    names = sorted((int(m[1]), k) for k in params if (m := re.fullmatch(r"features_(\d+)", k)))
    if not names:
        found = ", ".join(sorted(map(str, params))[:5])
        raise LayoutError(f"Flax variables without features_0, features_1, ... (found {found or 'nothing'}): not a MobileNet")

    def out(block, role):
        return int(np.shape(params[block][role]["conv"]["kernel"])[-1]) if role in params[block] else None

    stem, blocks, head = out("features_0", "stem"), [], None
    for index, name in names[1:]:
        roles = params[name]
        if "head" in roles:
            head = out(name, "head")
        elif "pointwise" in roles:
            blocks.append({"v2": False, "expand": None, "depthwise": out(name, "depthwise"), "out": out(name, "pointwise")})
        elif "project" in roles:
            blocks.append({"v2": True, "expand": out(name, "expand"), "depthwise": out(name, "depthwise"), "out": out(name, "project")})
        else:
            raise LayoutError(f"Flax variables: {name} has layers {sorted(roles)}, not a MobileNet block")
    if stem is None:
        raise LayoutError("Flax variables without a stem (features_0/stem)")
    # hidden_0, hidden_1, ..., classifier; none in a feature extractor. Activations are not in the
    # variables: ReLU between dense layers, as the description would say (files without one are
    # this project's own, whose hidden layers are ReLU).
    hidden = [int(np.shape(params[f"hidden_{i}"]["kernel"])[-1]) for i in range(len(params)) if f"hidden_{i}" in params]
    num_classes = int(np.shape(params["classifier"]["kernel"])[-1]) if "classifier" in params else 0
    arch = _torchvision.build(stem, blocks, head, num_classes, hidden=tuple(hidden), **kw)
    width = _torchvision.infer_width(arch)
    return arch if width is None else dataclasses.replace(arch, width_mult=width)


def preprocessing(config: Preprocessing | None = None, arch=None) -> Preprocessing:
    """The file's own where it has a description; else torchvision's, which the project's
    training defaults to."""
    return config or Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "bilinear")


_from_shapes, _default_preprocessing = architecture, preprocessing  # the names save_flax_variables' arguments take


def cannot_hold(arch: mobilenet_arch.Architecture) -> str | None:
    return None  # the description says everything the model is


# ---------------------------------------------------------------- the .msgpack file and its description


def save_flax_variables(
    variables: Mapping[str, Any],
    path: str | os.PathLike,
    architecture=None,
    preprocessing=None,
    extra: Mapping[str, Any] | None = None,
    labels: tuple[str, ...] | None = None,
) -> None:
    """Write `{"params", "batch_stats"}` to a .msgpack file, atomically, and beside it
    `<file>.json`: the architecture (inferred from the shapes when not given), preprocessing and
    class names (`labels`, where known), so that `parity.load(path)` needs no flags, and `extra`'s
    keys. The msgpack holds only arrays."""
    from parity import io

    if architecture is None:
        try:
            architecture = _from_shapes(flat_variables(variables))
        except LayoutError:  # not a MobileNet's tree: the weights alone, as asked
            architecture = None
    io.write_flax_variables(variables, path)
    if architecture is not None:
        io.write_text(io.description_path(path), description_json(architecture, preprocessing or _default_preprocessing(), extra, labels))


def read_description(path: str | os.PathLike):
    """(architecture, preprocessing, labels) written beside a .msgpack, or (None, None, None) for
    an older file. The class names are its `labels`, or in a description a training run wrote
    before parity kept them, the run's `class_names`."""
    from parity import io

    described = io.description_path(path)
    if not described.is_file():
        return None, None, None
    try:
        d = json.loads(described.read_text())
        names = d.get("labels") or d.get("class_names") or None  # a run on a dataset without names records []
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"labels must be a list of strings, not {type(names).__name__}")
        return architecture_from_json(d["architecture"]), Preprocessing.from_dict(d["preprocessing"]), None if names is None else tuple(names)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsFileError(f"{described} is not a readable description of {Path(path).name} ({first_line(e)}): delete it to infer the architecture from the shapes") from e


def architecture_to_json(arch: mobilenet_arch.Architecture) -> dict:
    return dataclasses.asdict(arch)


def architecture_from_json(d: Mapping[str, Any]) -> mobilenet_arch.Architecture:
    def pad(p):
        return p if isinstance(p, str) else mobilenet_arch.check_padding(p)

    blocks = tuple(
        mobilenet_arch.Block(**{**b, "layers": tuple(mobilenet_arch.ConvBN(**{**l, "pad": pad(l["pad"])}) for l in b["layers"])})
        for b in d["blocks"]
    )
    d = dict(d)
    if "head" in d:
        head = mobilenet_arch.Head(tuple(mobilenet_arch.Dense(**layer) for layer in d["head"]["layers"]), d["head"]["output"])
    else:  # a description written before heads were data: torchvision's Dropout, Linear
        head = mobilenet_arch.make_head(d.pop("num_classes"), d.pop("dropout"))
        d.pop("torch_classifier", None), d.pop("flax_classifier", None)
    return mobilenet_arch.Architecture(**{**d, "blocks": blocks, "head": mobilenet_arch.check_head(head)})


def description_json(
    arch: mobilenet_arch.Architecture, preprocessing: Preprocessing, extra: Mapping[str, Any] | None = None, labels: tuple[str, ...] | None = None
) -> str:
    """The architecture, preprocessing and class names (`labels`, where known) as JSON; `extra`'s
    keys (a training run's record, say) beside them, never in their place."""
    described = {"architecture": architecture_to_json(arch), "preprocessing": dataclasses.asdict(preprocessing)}
    if labels:
        described["labels"] = list(labels)
    described.update((key, value) for key, value in (extra or {}).items() if key not in described)
    return json.dumps(described, indent=1) + "\n"


def read(path: Path, ema: bool = False) -> Source:
    from parity import io

    variables = io.load_flax_variables(path)
    arch, pre, labels = read_description(path)
    if arch is None:
        # Wrong preprocessing fails quietly (plausible but worse predictions), so say what is assumed.
        warnings.warn(
            f"{path.name} has no description beside it ({io.description_path(path).name}): the defaults are in force, the architecture "
            f"from the shapes (symmetric padding, BN epsilon 1e-5) and torchvision's preprocessing ({preprocessing().describe()}); "
            "to give the right ones, pass parity.load(..., preprocessing=parity.Preprocessing(...), padding=..., bn_epsilon=...), "
            "then parity.save the checkpoint to write its description",
            stacklevel=2,
        )
    return Source(flat_variables(variables), arch, pre, NAME, labels)


def write(checkpoint, path: Path, num_batches_tracked: int = 0, extra: Mapping[str, Any] | None = None) -> None:
    save_flax_variables(
        checkpoint.variables, path, architecture=checkpoint.architecture, preprocessing=checkpoint.preprocessing, extra=extra, labels=checkpoint.labels
    )


def run_written(path: Path, checkpoint, images: np.ndarray) -> tuple[str, np.ndarray]:
    """This project's model on the file as `parity.load` reads it back."""
    import flax_mobilenet
    from parity import io

    arch, _, _ = read_description(path)
    model = flax_mobilenet.MobileNet(arch or checkpoint.architecture)
    return "Flax (the file read back)", np.asarray(model.apply(io.load_flax_variables(path), images, train=False))


LAYOUT = Layout(
    name=NAME,
    expects="params/features_0/stem/conv/kernel ... and batch_stats/... (Flax variables)",
    recognise=recognise,
    architecture=architecture,
    rules=rules,
    preprocessing=preprocessing,
    cannot_hold=cannot_hold,
    write=write,
    holds_labels=True,
    writes=lambda path: path.name.lower().endswith(SUFFIX),
    reads=(SUFFIX,),
    read=read,
    run_written=run_written,
)
