"""Which layout a checkpoint's keys are in: each layout module recognises its own keys."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from parity.layouts import LayoutError, short_list
from parity.layouts import hf, keras, timm, torchvision

LAYOUTS = {m.NAME: m for m in (torchvision, timm, hf, keras)}


def recognise(weights: Mapping[str, Any]) -> str:
    """The layout of `weights`' keys, or LayoutError saying what was seen and what each expects."""
    for name in ("hf", "timm", "keras", "torchvision"):
        if LAYOUTS[name].recognise(weights):
            if name == "timm" and (other := timm.other_model(weights)):
                raise LayoutError(f"{other}, not MobileNetV1/V2")
            return name
    stripped = strip_module_prefix(weights, quiet=True)
    if stripped is not weights:
        return recognise(stripped)
    expected = "; ".join(f"{name}: {m.EXPECTS}" for name, m in LAYOUTS.items())
    raise LayoutError(f"unrecognised layout: keys {short_list(sorted(weights), 4)}; expected {expected}")


def strip_module_prefix(weights: Mapping[str, Any], quiet: bool = False):
    if weights and all(k.startswith("module.") for k in weights):
        if not quiet:
            warnings.warn("the keys start with 'module.' (DataParallel): the prefix was stripped", stacklevel=3)
        return {k[len("module."):]: v for k, v in weights.items()}
    return weights
