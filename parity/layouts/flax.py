"""This project's own layout: Flax variables `{"params", "batch_stats"}` at
`features_i/<role>/{conv/kernel, bn/...}` and `classifier`. Files written by `parity` carry their
architecture beside them (`<file>.json`); for older files the channels are read from the shapes and
the rest is torchvision's (symmetric padding, epsilon 1e-5).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

import mobilenet_arch
from parity.layouts import LayoutError, Preprocessing, Rule, layer_rules
from parity.layouts import torchvision as _torchvision

NAME = "flax"


def rules(arch: mobilenet_arch.Architecture) -> list[Rule]:
    """Identity rules: the key is the Flax path itself."""
    out = layer_rules(arch, lambda i, block, layer: (f"params/{block.name}/{layer.role}/conv/kernel", ""), conv="same", depthwise="same")
    out = [Rule("/".join(r.flax_path), r.flax_path, "same") for r in out]
    for leaf in ("kernel", "bias"):
        path = ("params", arch.flax_classifier, leaf)
        out.append(Rule("/".join(path), path, "same"))
    return out


def architecture(variables: Mapping[str, Any], **kw) -> mobilenet_arch.Architecture:
    """The torchvision-style architecture whose Flax variables have these shapes."""
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    names = sorted((int(m[1]), k) for k in params if (m := re.fullmatch(r"features_(\d+)", k)))
    if not names or "classifier" not in params:
        found = ", ".join(sorted(map(str, params))[:5])
        raise LayoutError(f"Flax variables without features_0 ... and classifier (found {found or 'nothing'}): not a MobileNet")

    def out(block, role):
        return int(params[block][role]["conv"]["kernel"].shape[-1]) if role in params[block] else None

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
    num_classes = int(params["classifier"]["kernel"].shape[-1])
    arch = _torchvision.build(stem, blocks, head, num_classes, **kw)
    width = _torchvision.infer_width(arch)
    return arch if width is None else dataclasses.replace(arch, width_mult=width)


def preprocessing(config=None) -> Preprocessing:
    return _torchvision.preprocessing()


# The description written beside a .msgpack (`<file>.json`), so that it loads with no flags.


def architecture_to_json(arch: mobilenet_arch.Architecture) -> dict:
    return dataclasses.asdict(arch)


def architecture_from_json(d: Mapping[str, Any]) -> mobilenet_arch.Architecture:
    def pad(p):
        return p if isinstance(p, str) else mobilenet_arch.check_padding(p)

    blocks = tuple(
        mobilenet_arch.Block(**{**b, "layers": tuple(mobilenet_arch.ConvBN(**{**l, "pad": pad(l["pad"])}) for l in b["layers"])})
        for b in d["blocks"]
    )
    return mobilenet_arch.Architecture(**{**d, "blocks": blocks})


def description_json(arch: mobilenet_arch.Architecture, preprocessing: Preprocessing, extra: Mapping[str, Any] | None = None) -> str:
    """The architecture and preprocessing as JSON; `extra`'s keys (a training run's class names,
    say) beside them, never in their place."""
    described = {"architecture": architecture_to_json(arch), "preprocessing": dataclasses.asdict(preprocessing)}
    described.update((key, value) for key, value in (extra or {}).items() if key not in described)
    return json.dumps(described, indent=1) + "\n"
