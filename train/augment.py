"""Per-example image transforms (numpy uint8 HWC in, uint8 HWC out) and batch normalisation.

Randomness always comes from the `np.random.Generator` passed in, which the pipeline
(`train.data`) derives from (seed, epoch, position in the epoch), so every crop and flip
is reproducible and independent of how the epoch is split over processes.
Resizing is PIL bilinear (antialiased when shrinking, like torchvision's `antialias=True`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# ImageNet statistics (torchvision's), on the 0..255 scale so uint8 batches normalise in one step.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255

# Inception-style crop (Szegedy et al. 2015, as in torchvision's RandomResizedCrop).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Evaluation crop: resize the shorter side to resolution / 0.875, keep the centre (the
# standard ImageNet protocol, 224 of 256).
EVAL_CROP_FRACTION = 0.875


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey [H, W] or [H, W, 1] -> [H, W, 3]; RGB passes through."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def resize(image: np.ndarray, height: int, width: int, box=None) -> np.ndarray:
    """Bilinear resize of `image` (or of the float crop `box` = (left, top, right, bottom))."""
    if box is None and image.shape[:2] == (height, width):
        return image
    pil_image = Image.fromarray(np.ascontiguousarray(image))
    resized = pil_image.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


def pad_and_random_crop(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Zero-pad by `pad` on every side and crop back to the original size at a random offset
    (the CIFAR recipe of He et al. 2016, pad 4 at 32): a random shift of up to `pad` pixels
    with zero fill, computed as one copy because `np.pad` dominates the cost of small images."""
    height, width = image.shape[:2]
    dy, dx = (int(d) for d in rng.integers(-pad, pad + 1, size=2))
    out = np.zeros_like(image)
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A crop covering CROP_SCALE of the area with aspect ratio in CROP_RATIO, resized to
    size x size; after CROP_ATTEMPTS misses, the largest centred crop within CROP_RATIO
    (torchvision's `RandomResizedCrop.get_params`)."""
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return resize(image, size, size, box=(left, top, left + crop_w, top + crop_h))
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        crop_w, crop_h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        crop_w, crop_h = round(height * CROP_RATIO[1]), height
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return resize(image, size, size, box=(left, top, left + crop_w, top + crop_h))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size / EVAL_CROP_FRACTION and keep the centre size x size,
    done as one resize of the centred square of side EVAL_CROP_FRACTION * shorter side."""
    height, width = image.shape[:2]
    side = EVAL_CROP_FRACTION * min(height, width)
    top, left = (height - side) / 2, (width - side) / 2
    return resize(image, size, size, box=(left, top, left + side, top + side))


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32, ImageNet mean/std per channel."""
    return (images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
