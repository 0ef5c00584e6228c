"""Per-example image transforms and batch normalisation.

The digits and TFDS pipelines transform numpy uint8 HWC arrays; the image-folder pipeline
(`train.folder`) follows `Recipe`, torchvision's usual classification transforms, on PIL images,
with PIL doing what torchvision's PIL path does, so that the same draws give the same pixels.

Randomness always comes from the `np.random.Generator` passed in, which the pipeline
(`train.data`) derives from (seed, epoch, position in the epoch), so every crop and flip
is reproducible and independent of how the epoch is split over processes.
Resizing is PIL's (antialiased when shrinking, like torchvision's `antialias=True`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance

# ImageNet statistics (torchvision's) of RGB on the 0..1 scale, and on the 0..255 scale so that
# uint8 batches normalise in one step.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
IMAGENET_MEAN = np.array(IMAGENET_MEAN_RGB, np.float32) * 255
IMAGENET_STD = np.array(IMAGENET_STD_RGB, np.float32) * 255

# Inception-style crop (Szegedy et al. 2015, as in torchvision's RandomResizedCrop).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Evaluation crop: resize the shorter side to resolution / 0.875, keep the centre (the
# standard ImageNet protocol, 224 of 256).
EVAL_CROP_FRACTION = 0.875
EVAL_RESIZE, EVAL_CROP = 256, 224

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """torchvision's usual classification transforms, as values (what the flags of the same names
    set). Training: RandomResizedCrop(size, crop_scale, crop_ratio, interpolation),
    RandomHorizontalFlip(hflip), RandomRotation(rotation), ColorJitter(brightness, contrast,
    saturation, hue). Evaluation: Resize(eval_resize, interpolation), CenterCrop(eval_crop), or with
    eval_resize_mode "whole" the whole image resized to eval_crop (`parity.preprocess`). Both:
    Normalize(mean, std) of RGB on the 0..1 scale. `jpeg_draft`: decode JPEGs at 1/2, 1/4 or 1/8
    scale when the output needs no more pixels (`train.folder`)."""

    size: int
    eval_resize: int
    eval_crop: int
    crop_scale: tuple[float, float] = CROP_SCALE
    crop_ratio: tuple[float, float] = CROP_RATIO
    hflip: float = 0.5
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std: tuple[float, float, float] = IMAGENET_STD_RGB
    interpolation: str = "bilinear"
    eval_resize_mode: str = "shorter"  # or "whole": resize the whole image to eval_crop (parity.Preprocessing.resize)
    eval_crop_offset: str = "round"  # or "floor": transformers' crop corner (parity.Preprocessing.crop_offset)
    jpeg_draft: bool = True

    @property
    def resample(self) -> Image.Resampling:
        return INTERPOLATIONS[self.interpolation]


# The recipe's defaults, written once (the fields above): the flags of the same names start from them.
DEFAULTS = {field.name: field.default for field in dataclasses.fields(Recipe) if field.default is not dataclasses.MISSING}
# The training transforms, which a flag sets as given; a checkpoint may say the rest (the
# normalisation and the filter), and the evaluation's resize and crop follow the input size.
TRANSFORMS = tuple(name for name in DEFAULTS if name not in ("mean", "std", "interpolation", "eval_resize_mode", "eval_crop_offset"))


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
    """`crop_box`'s crop of `image`, resized to size x size."""
    height, width = image.shape[:2]
    left, top, crop_w, crop_h = crop_box(width, height, rng)
    return resize(image, size, size, box=(left, top, left + crop_w, top + crop_h))


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a crop covering `scale` of the area with aspect ratio in
    `ratio`; after CROP_ATTEMPTS misses, the largest centred crop within `ratio`
    (torchvision's `RandomResizedCrop.get_params`)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def flip_rotate_jitter(image: Image.Image, rng: np.random.Generator, recipe: Recipe) -> Image.Image:
    """The recipe's steps after the crop, in torchvision's order: RandomHorizontalFlip,
    RandomRotation (nearest neighbour, black corners, torchvision's defaults), ColorJitter."""
    if rng.random() < recipe.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if recipe.rotation:
        angle = rng.uniform(-recipe.rotation, recipe.rotation)
        image = image.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
    return color_jitter(image, rng, recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)


def color_jitter(
    image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> Image.Image:
    """torchvision's `ColorJitter` on a PIL RGB image: the four adjustments in a random order, each
    factor drawn from [max(0, 1 - x), 1 + x] (the hue shift from [-hue, hue]); a zero leaves its
    adjustment out."""
    if not (brightness or contrast or saturation or hue):
        return image
    for index in rng.permutation(4):
        if index == 0 and brightness:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(max(0.0, 1 - brightness), 1 + brightness))
        elif index == 1 and contrast:
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(max(0.0, 1 - contrast), 1 + contrast))
        elif index == 2 and saturation:
            image = ImageEnhance.Color(image).enhance(rng.uniform(max(0.0, 1 - saturation), 1 + saturation))
        elif index == 3 and hue:
            image = shift_hue(image, rng.uniform(-hue, hue))
    return image


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (torchvision's `adjust_hue` on a PIL image: the HSV hue
    byte wraps around)."""
    h, s, v = image.convert("HSV").split()
    hue = np.array(h, np.uint8) + np.array(np.int32(shift * 255)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert(image.mode)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size / EVAL_CROP_FRACTION and keep the centre size x size,
    done as one resize of the centred square of side EVAL_CROP_FRACTION * shorter side."""
    height, width = image.shape[:2]
    side = EVAL_CROP_FRACTION * min(height, width)
    top, left = (height - side) / 2, (width - side) / 2
    return resize(image, size, size, box=(left, top, left + side, top + side))


def normalize(
    images: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN_RGB, std: tuple[float, ...] = IMAGENET_STD_RGB
) -> np.ndarray:
    """uint8 [..., W, 3] -> float32, (x / 255 - mean) / std per channel (ImageNet's by default),
    computed as (x - 255 mean) / (255 std)."""
    # Rows of W * 3 values against the constants tiled along them: the same float32 operations as
    # broadcasting over the last axis, so the same bits, but numpy's inner loop runs over a whole
    # row instead of 3 values (several times faster).
    width = images.shape[-2]
    rows = images.reshape(-1, width * 3)
    out = np.subtract(rows, np.tile(np.array(mean, np.float32) * 255, width), dtype=np.float32)
    out /= np.tile(np.array(std, np.float32) * 255, width)
    return out.reshape(images.shape)
