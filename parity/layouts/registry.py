"""Every layout `parity` reads and writes, one `Layout` record each, and what is decided across
them: which layout a set of keys is in, which reads a file or a live model, which a file name
asks for, and which can hold an architecture.

A new layout is a module ending in its `LAYOUT` record, and one entry in `LAYOUTS`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import mobilenet_arch
from parity.layouts import Layout, LayoutError, Source, WeightsFileError, short_list
from parity.layouts import flax, hf, keras, timm, torchvision

# In the order keys and live models are tried: torchvision's comes after the libraries whose
# models are torch modules too, and reads any other module's state dict.
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (hf.LAYOUT, timm.LAYOUT, keras.LAYOUT, torchvision.LAYOUT, flax.LAYOUT)}
NAMES: tuple[str, ...] = tuple(LAYOUTS)


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}: expected {', '.join(NAMES)}")
    return LAYOUTS[name]


def recognise(weights: Mapping[str, Any]) -> str:
    """The layout of `weights`' keys (under a common prefix too), or LayoutError saying what was
    seen and what each layout expects."""
    return locate(weights, quiet=True)[0]


def locate(weights: Mapping[str, Any], quiet: bool = False) -> tuple[str, Mapping[str, Any]]:
    """(layout, the weights as it keys them): the keys themselves, or those under a common prefix
    where a training framework or the user's own module put the network (`module.` of
    DataParallel, Lightning's `model.`, a `backbone.` or `net.` attribute, nested ones), the prefix
    stripped with a note; or torchvision's `features` Sequential saved under another name (alone,
    or as a user's `backbone` beside its own head: `torchvision.features_elsewhere`), with a note.
    Bookkeeping scalars beside the network (an EMA's `n_averaged`) are left
    out with it; any other key outside the prefix is an error naming what else is there."""
    name = _recognised(weights)
    if name is not None:
        return name, weights
    for prefix in _prefixes(weights):
        inner = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        name = _recognised(inner)
        if name is None:
            continue
        outside = [k for k in weights if not k.startswith(prefix)]
        scalars = [k for k in outside if len(getattr(weights[k], "shape", ())) == 0]
        rest = [k for k in outside if k not in scalars]
        if rest:
            raise LayoutError(
                f"a {name} MobileNet under {prefix!r} and {len(rest)} other keys: {short_list(rest)}; "
                f"only a MobileNet with its classifier is read: save the network's own state dict (the module under {prefix.rstrip('.')!r})"
            )
        if not quiet:
            why = " (DataParallel)" if prefix == "module." else ""
            dropped = f"; left out {', '.join(scalars)}" if scalars else ""
            warnings.warn(f"the keys start with {prefix!r}{why}: the prefix was stripped{dropped}", stacklevel=3)
        return name, inner
    if moved := torchvision.features_elsewhere(weights):
        prefix, inner = moved
        if not quiet:
            where = f"under {prefix!r}, not 'features.'" if prefix else "alone (model.features.state_dict())"
            warnings.warn(f"torchvision's features Sequential is {where}: read as torchvision's, and a state dict written from it keys it features.*", stacklevel=3)
        return torchvision.NAME, inner
    expected = "; ".join(f"{name}: {l.expects}" for name, l in LAYOUTS.items())
    raise LayoutError(f"unrecognised layout: keys {short_list(sorted(weights), 4)}; expected {expected}")


def _recognised(weights: Mapping[str, Any]) -> str | None:
    for candidate in LAYOUTS.values():
        if candidate.recognise(weights):
            return candidate.name
    return None


def _prefixes(weights: Mapping[str, Any], depth: int = 3) -> list[str]:
    """Dotted key prefixes up to `depth` parts, those covering the most keys first."""
    counts: dict[str, int] = {}
    for key in weights:
        parts = key.split(".")
        for n in range(1, min(depth, len(parts) - 1) + 1):
            prefix = ".".join(parts[:n]) + "."
            counts[prefix] = counts.get(prefix, 0) + 1
    return sorted(counts, key=lambda p: (-counts[p], len(p)))


def read_path(path: Path, ema: bool = False) -> Source:
    """A file or directory, read by the layout whose `reads` names its kind."""
    kind = "/" if path.is_dir() else path.suffix.lower()
    if kind != "/" and not path.is_file():
        raise WeightsFileError(f"{path}: no such file or directory")
    for candidate in LAYOUTS.values():
        if kind in candidate.reads:
            source = candidate.read(path, ema=ema)
            if source is not None:  # None: another layout's file of this kind (a directory)
                return source
    readable = [suffix for l in LAYOUTS.values() for suffix in l.reads if suffix != "/"]
    if kind == "/":
        raise WeightsFileError(f"{path}: a directory without config.json: expected a Hugging Face model directory (transformers' or timm's)")
    raise WeightsFileError(f"{path}: unknown extension {path.suffix or '(none)'!r}: expected {', '.join(readable[:-1])} or {readable[-1]}, or a Hugging Face directory")


def read_model(model: Any) -> Source:
    """A live model of any library a layout reads."""
    for candidate in LAYOUTS.values():
        source = candidate.of_model(model)
        if source is not None:
            return source
    raise LayoutError(f"a {type(model).__name__}: expected a file, a directory, a state dict or a torchvision, timm, transformers or keras model")


def layout_for_path(path: Path) -> str:
    """The layout a file name asks for when writing."""
    for candidate in LAYOUTS.values():
        if candidate.write is not None and candidate.writes(path):
            return candidate.name
    raise LayoutError(
        f"{path}: unknown extension {path.suffix!r}: expected .msgpack, .pth, .pt, .safetensors, .keras, .weights.h5 "
        "or a directory (Hugging Face), or name the layout (--layout)"
    )


def holders(arch: mobilenet_arch.Architecture) -> list[str]:
    """The layouts that can hold `arch` whole."""
    return [l.name for l in LAYOUTS.values() if l.write is not None and l.cannot_hold(arch) is None]


def check_can_hold(name: str, arch: mobilenet_arch.Architecture) -> None:
    """LayoutError where `name` cannot hold `arch`: what would be lost, and the layouts that can."""
    reason = layout(name).cannot_hold(arch)
    if reason is None:
        return
    others = [".msgpack" if n == flax.NAME else n for n in holders(arch) if n != name]
    hint = f": save them as {', '.join(others[:-1])} or {others[-1]}" if len(others) > 1 else f": save them as {others[0]}" if others else ""
    raise LayoutError(f"{reason}{hint}")
