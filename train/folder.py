"""A folder of images in torchvision's ImageFolder layout, read and decoded with PIL.

    DIR/train/CLASS/**/*.jpg    training images; the classes are train/'s subfolders, sorted by
                                name (so class i is torchvision's ImageFolder(DIR/train) class i)
    DIR/val/CLASS/... or DIR/test/CLASS/...
                                evaluation images, under train/'s class names (any subset)

Files are those of torchvision's IMG_EXTENSIONS (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp,
any case), found as `ImageFolder` finds them (subfolders followed, sorted). `find(root)` checks
the layout and opens every image before any work; the first problem is a `DataError` of one line.

Decoding converts to RGB as torchvision's loader does. A JPEG is decoded at 1/2, 1/4 or 1/8 of
its size (PIL's draft mode: libjpeg scales while decoding) when the crop, so reduced, still has
at least the output's pixels; the crop box is scaled with it, so the same region is taken. The
pixels then differ from a full decode's by the resampling (see tests/test_train_folder.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from train import augment

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "test")
DRAFT_SCALES = (8, 4, 2)  # what libjpeg's DCT scaling offers, largest first
# Unreadable files named in the error; the rest are counted.
NAMED_FILES = 3


class DataError(ValueError):
    """A dataset problem the user can fix; the message is one line. (`train.data.DataError`: it
    lives here, in the lowest module that raises it.)"""


@dataclasses.dataclass(frozen=True)
class Folder:
    root: str
    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, label), ImageFolder's order
    eval: tuple[tuple[str, int], ...]
    eval_split: str  # "val" or "test"


@functools.lru_cache(maxsize=4)
def find(root: str, threads: int | None = None) -> Folder:
    """The images of `root`, every one opened once (in `threads` threads; default one per core):
    a missing train/, val/ or test/, an empty class, a class of the evaluation split that is not
    in train/ or an unreadable image is a DataError. Cached: a run reads the folder once."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError(f"--dataset {root}: no such folder; expected a folder with train/CLASS/*.jpg and val/ (or test/) in it")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"{root} has no train/ folder: expected the training images in {train_dir}/CLASS/*.jpg (ImageFolder's layout)")
    class_names = _class_folders(train_dir)
    if not class_names:
        raise DataError(f"{train_dir} has no class folders: expected one folder of images per class, e.g. {train_dir}/cat/1.jpg")
    eval_split = next((split for split in EVAL_SPLITS if os.path.isdir(os.path.join(root, split))), None)
    if eval_split is None:
        raise DataError(f"{root} has neither val/ nor test/: expected the evaluation images in {root}/val/CLASS/*.jpg")
    eval_dir = os.path.join(root, eval_split)
    unknown = sorted(set(_class_folders(eval_dir)) - set(class_names))
    if unknown:
        raise DataError(
            f"{eval_dir} has classes that {train_dir} lacks: {', '.join(unknown)}; "
            "expected the evaluation classes to be training classes (add their training images or remove them)"
        )
    labels = {name: label for label, name in enumerate(class_names)}
    train = _images(train_dir, class_names, labels)
    evaluation = _images(eval_dir, _class_folders(eval_dir), labels)
    check_images([path for path, _ in train + evaluation], threads)
    return Folder(root, tuple(class_names), tuple(train), tuple(evaluation), eval_split)


def _class_folders(directory: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _images(directory: str, class_names: list[str], labels: dict[str, int]) -> list[tuple[str, int]]:
    """torchvision's `make_dataset`: each class folder walked in sorted order, subfolders too."""
    images = []
    for name in class_names:
        class_dir = os.path.join(directory, name)
        found = image_files(class_dir)
        if not found:
            raise DataError(
                f"class folder {class_dir} has no images: expected files ending in {' '.join(IMG_EXTENSIONS)} "
                "(any case); add some or remove the folder"
            )
        images += [(path, labels[name]) for path in found]
    return images


def image_files(directory: str) -> list[str]:
    """The images under `directory`, subfolders followed, in sorted order (as ImageFolder walks a
    class folder)."""
    return [
        os.path.join(folder, file)
        for folder, _, files in sorted(os.walk(directory, followlinks=True))
        for file in sorted(files)
        if file.lower().endswith(IMG_EXTENSIONS)
    ]


def check_images(paths: list[str], threads: int | None = None) -> None:
    """Decode every image (a JPEG at 1/8 scale: libjpeg still reads all of its data, so a
    truncated or damaged file is found at a fraction of the cost); a DataError names the files
    that fail. PIL releases the GIL while decoding, so threads scale with cores."""
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        problems = [(path, problem) for path, problem in zip(paths, pool.map(_problem, paths)) if problem]
    if problems:
        named = "; ".join(f"{path} ({problem})" for path, problem in problems[:NAMED_FILES])
        more = f" and {len(problems) - NAMED_FILES} more" if len(problems) > NAMED_FILES else ""
        raise DataError(f"{len(problems)} unreadable image(s): {named}{more}; replace or remove them")


def _problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... on a bad file
        return str(error) or type(error).__name__
    return None


def train_example(example: tuple[str, int], rng: np.random.Generator, recipe: augment.Recipe) -> dict:
    """(path, label) -> {"image": uint8 [size, size, 3], "label"}: RandomResizedCrop, then
    `augment.flip_rotate_jitter`."""
    path, label = example
    with _open(path) as image:
        left, top, width, height = augment.crop_box(*image.size, rng, recipe.crop_scale, recipe.crop_ratio)
        scale = _draft(image, width, height, recipe.size, recipe.size) if recipe.jpeg_draft else 1
        image = _rgb(image, path)
        size = (recipe.size, recipe.size)
        if scale == 1:
            # torchvision's resized_crop exactly: the crop, then the resize of the crop alone.
            crop = image.crop((left, top, left + width, top + height)).resize(size, recipe.resample)
        else:
            box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
            crop = image.resize(size, recipe.resample, box=box)
    return {"image": np.asarray(augment.flip_rotate_jitter(crop, rng, recipe)), "label": label}


def eval_example(example: tuple[str, int], recipe: augment.Recipe) -> dict:
    """(path, label) -> {"image": uint8 [eval_crop, eval_crop, 3], "label"}: prepared as
    `parity.preprocess` prepares a checkpoint's images (torchvision's Resize and CenterCrop, bit
    for bit without draft mode, or the whole image resized), not yet normalised."""
    # Inside the function: parity imports both frameworks, and train.folder neither.
    from parity import preprocess

    path, label = example
    preprocessing = eval_preprocessing(recipe)
    with _open(path) as image:
        width, height = image.size
        scale = _draft(image, width, height, *preprocess.resized_size(width, height, preprocessing)) if recipe.jpeg_draft else 1
        image = _rgb(image, path)
        return {"image": preprocess.resize_and_crop(image, preprocessing, (width, height), scale), "label": label}


@functools.lru_cache(maxsize=8)
def eval_preprocessing(recipe: augment.Recipe):
    """The recipe's evaluation transforms as a `parity.Preprocessing`."""
    from parity.layouts import Preprocessing

    return Preprocessing(recipe.mean, recipe.std, recipe.eval_resize, recipe.eval_crop, recipe.interpolation, recipe.eval_resize_mode, recipe.eval_crop_offset)


def _open(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except Exception as error:
        raise DataError(f"cannot read image {path} ({error}); replace or remove it") from None


def _rgb(image: Image.Image, path: str) -> Image.Image:
    try:
        return image.convert("RGB")
    except Exception as error:
        raise DataError(f"cannot decode image {path} ({error}); replace or remove it") from None


def _draft(image: Image.Image, width: int, height: int, out_width: int, out_height: int) -> int:
    """Set a JPEG to decode at 1/scale of its size, the largest scale that leaves the region of
    width x height pixels at least out_width x out_height; the scale (1 if none, or not a JPEG)."""
    if image.format != "JPEG":
        return 1
    scale = next((s for s in DRAFT_SCALES if width >= s * out_width and height >= s * out_height), 1)
    if scale == 1:
        return 1
    full_width, full_height = image.size
    # draft picks the largest scale s with size // requested >= s: this request gives exactly `scale`.
    result = image.draft("RGB", (full_width // scale, full_height // scale))
    if result is None:
        return 1
    return round(full_width / result[1][2])
