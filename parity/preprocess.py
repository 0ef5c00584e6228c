"""Images prepared as a checkpoint's `Preprocessing` says: `Checkpoint.preprocess` (which
train.predict uses), and the resize and crop of the image-folder pipeline's evaluation (train.eval
on a folder, parity.export's calibration).

    batch = ckpt.preprocess(["cat.jpg", "dog.png"])   # float32 NHWC, ready for ckpt.logits(batch)

Each image (a path, a PIL image, or a uint8 array HxW, HxWx1, HxWx3 or HxWx4) is converted to RGB
as torchvision's loader does (`Image.convert("RGB")`: grey repeated, alpha dropped, a palette
looked up), with no EXIF rotation (neither torchvision nor PIL applies one), then resized with
PIL's resampling, which antialiases when shrinking (torchvision's `Resize` on a PIL image is
PIL's `resize`; Keras's `load_img(target_size=...)` is too):

    resize="shorter"  the shorter side to `resize_size`, the longer rounded down, then the centre
                      `crop_size` square: torchvision's `Resize(resize_size)`, `CenterCrop(crop_size)`
                      (timm's evaluation transform is the same two steps); with crop_offset="floor"
                      the crop's corner is rounded down, as transformers' image processors place it
    resize="whole"    the whole image to `crop_size` x `crop_size`, no crop: Keras's convention

and normalised: x / 255, then (x - mean) / std, computed as x * (1 / (255 std)) - mean / std in
float32, the same two constants that `parity.export --with-preprocessing` puts in the model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from parity.layouts import Preprocessing

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
RESIZES = ("shorter", "whole")
CROP_OFFSETS = ("round", "floor")


class ImageError(ValueError):
    """An image that cannot be read, or a preprocessing that cannot be followed; the message is
    one line and names it."""


def preprocess(images: Any, preprocessing: Preprocessing) -> np.ndarray:
    """float32 [N, crop, crop, 3]: `images` (one image or a list of them, or a uint8 NHWC batch)
    resized, cropped and normalised as `preprocessing` says."""
    return normalise(np.stack([resize_and_crop(open_rgb(image), preprocessing) for image in _each(images)]), preprocessing)


def _each(images: Any) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageError("no images given: expected a path, a PIL image, a uint8 array, or a list of them")
        return list(images)
    return [images]


def open_rgb(image: Any) -> Image.Image:
    """`image` (a path, a PIL image, or a uint8 array) as a decoded PIL RGB image."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")  # decodes the whole file: a damaged one fails here
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... on a bad file
            raise ImageError(f"cannot read image {os.fspath(image)} ({error or type(error).__name__}): expected an image file PIL reads (JPEG, PNG, ...)") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(_hwc_uint8(image)).convert("RGB")
    raise ImageError(f"cannot prepare {type(image).__name__} {str(image)[:40]!r} as an image: expected a path, a PIL image or a uint8 array (HxWx3)")


def _hwc_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(f"an image array of {array.dtype}: expected uint8, 0..255 (convert with (x * 255).round().astype(np.uint8) if it holds 0..1)")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageError(f"an image array of shape {array.shape}: expected HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), channels last")
    return np.ascontiguousarray(array)


def resized_size(width: int, height: int, preprocessing: Preprocessing) -> tuple[int, int]:
    """(width, height) of a width x height image after the resize, before the crop. "shorter":
    torchvision's `Resize(int)`, the aspect kept and the longer side rounded down."""
    _check(preprocessing)
    if preprocessing.resize == "whole":
        return preprocessing.crop_size, preprocessing.crop_size
    shorter = preprocessing.resize_size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_box(width: int, height: int, size: int, offset: str = "round") -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred size x size square of an image at least `size`
    a side (a resize to at least the crop): (width - size) / 2 rounded as torchvision's
    `CenterCrop` rounds it (Python's round), or rounded down as transformers' `center_crop`."""
    if offset == "floor":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def resize_and_crop(image: Image.Image, preprocessing: Preprocessing, size: tuple[int, int] | None = None, scale: int = 1) -> np.ndarray:
    """uint8 [crop, crop, 3] of an RGB image. `image` may be decoded at 1/`scale` of an image of
    `size` (width, height) (a JPEG in PIL's draft mode): the geometry is then the full image's,
    and the resize reads the same region of the smaller decode."""
    width, height = size or image.size
    box = None if scale == 1 else (0, 0, width / scale, height / scale)
    resized = resized_size(width, height, preprocessing)
    image = image.resize(resized, RESAMPLING[preprocessing.interpolation], box=box)
    if preprocessing.resize == "shorter":
        image = image.crop(center_box(*resized, preprocessing.crop_size, preprocessing.crop_offset))
    return np.asarray(image)


def normalisation(preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, shift) per channel with x * scale + shift = (x / 255 - mean) / std."""
    mean, std = np.asarray(preprocessing.mean, np.float64), np.asarray(preprocessing.std, np.float64)
    return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalise(images: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """uint8 [..., 3] RGB -> float32 (x / 255 - mean) / std."""
    scale, shift = normalisation(preprocessing)
    return images.astype(np.float32) * scale + shift


def _check(preprocessing: Preprocessing) -> None:
    if preprocessing.interpolation not in RESAMPLING:
        raise ImageError(f"interpolation {preprocessing.interpolation!r}: expected one of {', '.join(RESAMPLING)}; pass preprocessing=Preprocessing(..., interpolation=...)")
    if preprocessing.resize not in RESIZES:
        raise ImageError(f"resize {preprocessing.resize!r}: expected one of {', '.join(RESIZES)}; pass preprocessing=Preprocessing(..., resize=...)")
    if preprocessing.resize == "shorter" and preprocessing.resize_size < preprocessing.crop_size:
        raise ImageError(
            f"resize_size {preprocessing.resize_size} is below crop_size {preprocessing.crop_size}: the centre crop would run off the image; "
            "expected resize_size >= crop_size (or resize='whole')"
        )
    if preprocessing.crop_offset not in CROP_OFFSETS:
        raise ImageError(f"crop_offset {preprocessing.crop_offset!r}: expected one of {', '.join(CROP_OFFSETS)}; pass preprocessing=Preprocessing(..., crop_offset=...)")
