"""Names that are not paths: models on the Hugging Face Hub and torchvision's weights, fetched
and cached by the libraries' own functions (huggingface_hub's `snapshot_download`, torch.hub's
cache of torchvision's files), then read like any local checkpoint.

    hf-hub:timm/mobilenetv2_100.ra_in1k      a Hub repository (timm's form)
    google/mobilenet_v2_1.0_224              the same, as transformers writes it
    mobilenetv2_100, mobilenetv2_100.ra_in1k a timm model name: its pretrained weights' repository
    MobileNet_V2_Weights.IMAGENET1K_V2       torchvision's weights (`.DEFAULT` too)

Offline (`HF_HUB_OFFLINE=1`, or no network) only what is cached resolves; anything else is one
line saying so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from parity.layouts import Preprocessing, WeightsFileError

HF_HUB_PREFIX = "hf-hub:"
# What every form accepts, for the message that names them.
FORMS = "a file, a directory, hf-hub:ORG/NAME or ORG/NAME (Hugging Face Hub), a timm model name, or torchvision's MobileNet_V2_Weights.IMAGENET1K_V2"
# The files a MobileNet repository needs: its config, weights and preprocessing.
PATTERNS = ["*.json", "*.safetensors", "*.bin"]


def resolve(name: str) -> tuple[Path, Preprocessing | None, tuple[str, ...] | None]:
    """The local path (a directory, or a file) holding the checkpoint `name` names, and its
    preprocessing and class names where the path cannot say them (torchvision's weights enums)."""
    from parity.layouts.registry import LAYOUTS

    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir())
    if looks_local or path.suffix.lower() in {suffix for layout in LAYOUTS.values() for suffix in layout.reads}:
        raise WeightsFileError(f"{name}: no such file or directory")
    if name.startswith(HF_HUB_PREFIX):
        return _hub(name[len(HF_HUB_PREFIX):], name), None, None
    if re.fullmatch(r"MobileNet_V[12]_Weights\.\w+", name):
        return _torchvision(name)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _hub(name, name), None, None
    repo = _timm_repository(name)
    if repo is not None:
        return _hub(repo, name), None, None
    raise WeightsFileError(f"{name}: no such file or directory, nor a model name: expected {FORMS}")


def _hub(repo: str, asked: str) -> Path:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise WeightsFileError(f"{asked}: a Hugging Face Hub name needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=PATTERNS))
    except RepositoryNotFoundError:
        raise WeightsFileError(f"{asked}: no repository {repo} on the Hugging Face Hub (or it is private): check the name") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise WeightsFileError(
            f"{asked}: {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}: "
            "run once online, or give the path of a downloaded copy"
        ) from None
    except HfHubHTTPError as e:
        raise WeightsFileError(f"{asked}: the Hugging Face Hub refused {repo} ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # huggingface_hub's HFValidationError: not a repository id
        raise WeightsFileError(f"{asked}: no such file or directory, nor a valid Hub repository id ({str(e).splitlines()[0]})") from None


def _timm_repository(name: str) -> str | None:
    """The Hub repository of timm's pretrained weights for `name` (with or without its tag)."""
    try:
        import timm
    except ImportError:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def _torchvision(name: str) -> tuple[Path, Preprocessing, tuple[str, ...]]:
    """torchvision's file for the weights enum `name`, from torch.hub's cache (downloaded there
    when online, as torchvision's own `get_state_dict` does), the enum's transforms and its
    class names (`meta["categories"]`: ImageNet's)."""
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise WeightsFileError(f"{name}: torchvision has no such weights (expected e.g. MobileNet_V2_Weights.IMAGENET1K_V2)") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TORCH_HUB_OFFLINE") == "1":
            raise WeightsFileError(f"{name}: {cached.name} is not in torch.hub's cache ({cached.parent}) and the session is offline: run once online")
        try:
            torch.hub.download_url_to_file(weights.url, str(cached), progress=False)
        except OSError as e:
            raise WeightsFileError(f"{name}: could not download {weights.url} into {cached.parent} ({e.__class__.__name__}): run once online") from None
    t = weights.transforms()
    pre = Preprocessing(tuple(t.mean), tuple(t.std), int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value)
    return cached, pre, tuple(weights.meta["categories"])
