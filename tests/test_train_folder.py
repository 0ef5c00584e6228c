"""Specification of `--dataset DIR`: a folder of images in torchvision's ImageFolder layout
(train/folder.py), its pipeline (train/data.py) and torchvision's recipe (train/augment.py)."""

from __future__ import annotations

import dataclasses
import os
import types

import numpy as np
import pytest
from PIL import Image

from tests.cli_errors import assert_one_line_error
from train import augment, data, datasets, folder
from train import config as config_lib

CLASSES = ("dog", "cat", "Bird")  # ImageFolder sorts by code point: Bird, cat, dog
RES = 32
BATCH = 8


def write_image(path, rng, size=(50, 40)):
    """A smooth random image (a 5x4 grid of colours, resized up), so that JPEG keeps it close."""
    grid = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(grid).resize(size, Image.Resampling.BILINEAR).save(path)


def make_folder(root, train=8, evaluation=2, eval_classes=("cat", "Bird")):
    rng = np.random.default_rng(0)
    # Any case of an extension counts, as for torchvision; other files are ignored.
    suffixes = (".png", ".JPG", ".jpeg", ".Png")
    for split, count, classes in (("train", train, CLASSES), ("val", evaluation, eval_classes)):
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(count):
                write_image(root / split / name / f"{i}{suffixes[i % 4]}", rng)
            (root / split / name / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


def recipe(**flags):
    return dataclasses.replace(data.recipe(None, RES), **flags)


def train_epoch(root, **kwargs):
    args = dict(resolution=RES, global_batch_size=BATCH, seed=0, epoch=0, workers=0) | kwargs
    return list(data.train_batches(root, **args))


def eval_epoch(root, **kwargs):
    return list(data.eval_batches(root, **(dict(resolution=RES, global_batch_size=BATCH, workers=0) | kwargs)))


def concat(batches, key):
    return np.concatenate([b[key] for b in batches])


# --- layout --------------------------------------------------------------------------------


def test_classes_and_files_are_imagefolders(images):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(os.path.join(images, "train"))
    info = data.dataset_info(images)
    assert info.class_names == tuple(reference.classes) == ("Bird", "cat", "dog")
    assert (info.num_classes, info.train_size, info.eval_size) == (3, 24, 4)
    assert list(folder.find(images).train) == reference.samples
    # The evaluation split keeps train/'s labels for its subset of the classes.
    assert {label for _, label in folder.find(images).eval} == {0, 1}


@pytest.mark.parametrize(
    "layout, fragment",
    [
        ("no-train", "has no train/ folder"),
        ("no-eval", "has neither val/ nor test/"),
        ("empty-class", "has no images"),
        ("unknown-eval-class", "has classes that"),
        ("missing", "no such folder"),
    ],
)
def test_a_bad_layout_is_one_line_before_any_work(tmp_path, layout, fragment):
    root = tmp_path / "images"
    if layout != "missing":
        make_folder(root, train=1, evaluation=1)
    if layout == "no-train":
        os.rename(root / "train", root / "elsewhere")
    elif layout == "no-eval":
        os.rename(root / "val", root / "elsewhere")
    elif layout == "empty-class":
        os.makedirs(root / "train" / "empty")
    elif layout == "unknown-eval-class":
        os.makedirs(root / "val" / "zebra")
        write_image(root / "val" / "zebra" / "1.png", np.random.default_rng(0))
    with pytest.raises(data.DataError) as error:
        data.dataset_info(str(root))
    message = str(error.value)
    assert fragment in message and "\n" not in message, message
    if layout == "unknown-eval-class":
        assert "zebra" in message


def test_the_test_folder_serves_when_there_is_no_val(tmp_path):
    root = make_folder(tmp_path / "images", train=1, evaluation=1)
    os.rename(os.path.join(root, "val"), os.path.join(root, "test"))
    assert folder.find(root).eval_split == "test"


def test_unreadable_images_are_named_before_any_work(tmp_path):
    root = make_folder(tmp_path / "images", train=2, evaluation=1)
    truncated = os.path.join(root, "train", "cat", "0.png")
    with open(truncated, "r+b") as file:
        file.truncate(os.path.getsize(truncated) // 2)
    not_an_image = os.path.join(root, "train", "dog", "text.jpg")
    with open(not_an_image, "w") as file:
        file.write("not an image")
    with pytest.raises(data.DataError) as error:
        data.dataset_info(root)
    message = str(error.value)
    assert "2 unreadable image(s)" in message and "\n" not in message, message
    assert truncated in message and not_an_image in message


def test_a_truncated_jpeg_is_found_too(tmp_path):
    # A JPEG's header can be whole while its data is cut: the check decodes (at 1/8 scale).
    path = tmp_path / "cut.jpg"
    write_image(path, np.random.default_rng(0), size=(400, 300))
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)
    with pytest.raises(data.DataError, match="cut.jpg"):
        folder.check_images([str(path)])


# --- batches -------------------------------------------------------------------------------


def test_eval_batches_are_torchvisions_resize_center_crop_normalize(images):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    batches = eval_epoch(images)
    assert [b["image"].shape for b in batches] == [(BATCH, RES, RES, 3)]
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(batches[0]["mask"], np.arange(BATCH) < 4)
    # The default evaluation: the shorter side to 32 / 0.875 = 36, the centre 32 x 32, ImageNet's
    # mean and std (these images are too small for draft mode to change the decoding).
    transform = transforms.Compose(
        [
            transforms.Resize(36),
            transforms.CenterCrop(RES),
            transforms.ToTensor(),
            transforms.Normalize(augment.IMAGENET_MEAN_RGB, augment.IMAGENET_STD_RGB),
        ]
    )
    reference = ImageFolder(os.path.join(images, "val"), transform=transform)
    expected = np.stack([reference[i][0].numpy().transpose(1, 2, 0) for i in range(len(reference))])
    # The same uint8 pixels; 1e-5 is float32 rounding ((x / 255 - mean) / std against
    # (x - 255 mean) / (255 std)).
    np.testing.assert_allclose(batches[0]["image"][:4], expected, atol=1e-5)
    # val/ has only cat and Bird: labels are train/'s indices, not val/'s own.
    np.testing.assert_array_equal(batches[0]["label"][:4], [folder.find(images).eval[i][1] for i in range(4)])


def test_train_batches_are_an_epoch_of_normalised_crops(images):
    batches = train_epoch(images)
    assert len(batches) == data.steps_per_epoch(images, BATCH) == 24 // BATCH
    assert all(b["image"].shape == (BATCH, RES, RES, 3) and b["image"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.sort(concat(batches, "label")), np.repeat([0, 1, 2], 8))
    pixels = concat(batches, "image") * augment.IMAGENET_STD + augment.IMAGENET_MEAN
    # Back to 0..255, up to float32 rounding.
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_worker_processes_and_any_number_of_threads_give_the_same_batches(images):
    # grain's worker processes (the pipeline pickled into them) against threads of this one (one per
    # core by default, here 2), and one thread: the draws depend on the position in the epoch only.
    reference = train_epoch(images, epoch=1)
    for other in (train_epoch(images, epoch=1, workers=1), train_epoch(images, epoch=1, threads=1)):
        for a, b in zip(reference, other, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


def test_augmentation_flags_change_training_batches_not_evaluation(images):
    plain = recipe()
    for flags in (dict(rotation=30.0), dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1), dict(hflip=0.0)):
        changed = recipe(**flags)
        train = [concat(train_epoch(images, recipe=r), "image") for r in (plain, changed)]
        assert not np.array_equal(*train), flags
        evaluation = [concat(eval_epoch(images, recipe=r), "image") for r in (plain, changed)]
        np.testing.assert_array_equal(*evaluation)


def test_colour_jitter_of_zero_and_a_flip_of_one_are_exact():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    out = augment.flip_rotate_jitter(image, np.random.default_rng(0), recipe(hflip=1.0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image)[:, ::-1])


def test_mean_and_std_normalise(images):
    (batch,) = eval_epoch(images, recipe=recipe(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    (imagenet,) = eval_epoch(images)
    pixels = imagenet["image"] * augment.IMAGENET_STD + augment.IMAGENET_MEAN
    # 1e-4: float32 rounding of both normalisations on values up to ~2.
    np.testing.assert_allclose(batch["image"], (pixels / 255 - 0.5) / 0.25, atol=1e-4)


# --- draft mode ----------------------------------------------------------------------------


def test_draft_mode_takes_the_same_region_as_a_full_decode(tmp_path):
    # A gradient, half a level per pixel across (red) and 0.68 down (green): a crop region off
    # by one source pixel would shift a channel's mean by that much. Draft mode averages 2x2 to
    # 8x8 blocks in the JPEG decoder and the resize then filters fewer pixels: at most 2 levels
    # apart per pixel, and a bias of at most 0.25 level (half a pixel of the ramp).
    y, x = np.mgrid[0:375, 0:500]
    ramp = np.stack([x * 255 / 499, y * 255 / 374, (x + y) * 255 / 873], axis=-1).astype(np.uint8)
    path = str(tmp_path / "ramp.jpg")
    Image.fromarray(ramp).save(path, quality=95)
    draft, full = recipe(crop_scale=(0.1, 1.0)), recipe(crop_scale=(0.1, 1.0), jpeg_draft=False)
    scales = set()
    for seed in range(8):
        left, top, width, height = augment.crop_box(500, 375, np.random.default_rng(seed), draft.crop_scale, draft.crop_ratio)
        scales.add(next((s for s in folder.DRAFT_SCALES if min(width, height) >= s * RES), 1))
        a, b = (folder.train_example((path, 0), np.random.default_rng(seed), r)["image"].astype(float) for r in (draft, full))
        assert np.abs(a - b).max() <= 2 and np.abs((a - b).mean(axis=(0, 1))).max() <= 0.25, seed
    assert scales >= {4, 8}
    a, b = (folder.eval_example((path, 0), r)["image"].astype(float) for r in (draft, full))
    assert np.abs(a - b).max() <= 2 and np.abs((a - b).mean(axis=(0, 1))).max() <= 0.25


def test_draft_mode_decodes_a_jpeg_at_the_largest_scale_the_output_allows(tmp_path):
    path = tmp_path / "photo.jpg"
    write_image(path, np.random.default_rng(0), size=(500, 375))
    for out, scale in ((32, 8), (64, 4), (150, 2), (200, 1)):
        with Image.open(path) as image:
            assert folder._draft(image, 500, 375, out, out) == scale
            assert image.size == (-(-500 // scale), -(-375 // scale))  # libjpeg rounds up
    png = Image.fromarray(np.zeros((375, 500, 3), np.uint8))
    assert folder._draft(png, 500, 375, 32, 32) == 1


# --- recipe and flags ----------------------------------------------------------------------


def test_the_recipe_takes_flags_over_the_checkpoint_over_torchvision():
    assert (recipe().eval_resize, recipe().eval_crop, recipe().interpolation) == (36, 32, "bilinear")
    # Anything with parity's Preprocessing fields: here timm's at 224 (crop_pct 0.9, bicubic).
    checkpoint = types.SimpleNamespace(mean=(0.5,) * 3, std=(0.5,) * 3, resize_size=248, crop_size=224, interpolation="bicubic", resize="shorter", crop_offset="round")
    at_224 = data.recipe(None, 224, checkpoint)
    assert (at_224.eval_resize, at_224.eval_crop, at_224.mean, at_224.interpolation) == (248, 224, (0.5,) * 3, "bicubic")
    # Another resolution keeps the checkpoint's ratio of resize to crop.
    assert data.recipe(None, 160, checkpoint).eval_resize == 160 * 248 // 224
    flags = config_lib.parse_config(["--dataset", "./x", "--mean", "0.1", "0.2", "0.3", "--interpolation", "nearest", "--eval-resize", "300"])
    given = data.recipe(flags, 224, checkpoint)
    assert (given.mean, given.std, given.interpolation, given.eval_resize) == ((0.1, 0.2, 0.3), (0.5,) * 3, "nearest", 300)


def test_config_defaults_are_the_recipes():
    from_config = data.recipe(config_lib.Config(), RES)
    assert from_config == augment.Recipe(size=RES, eval_resize=36, eval_crop=RES)


def test_an_eval_resize_below_the_crop_is_refused():
    flags = config_lib.parse_config(["--dataset", "./x", "--eval-resize", "200", "--eval-crop", "224"])
    with pytest.raises(data.DataError, match="--eval-resize 200 is smaller than --eval-crop 224"):
        data.recipe(flags, 224)


def test_folder_only_flags_with_digits_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        config_lib.parse_config(["--rotation", "10"])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "--rotation applies to an image folder", "(see --help)")


def test_a_dataset_is_a_folder_when_it_reads_as_a_path_or_holds_train(images, tmp_path, monkeypatch):
    assert datasets.is_folder(images) and datasets.is_folder("./photos") and datasets.is_folder("~/photos")
    assert not datasets.is_folder("digits") and not datasets.is_folder("cifar10")
    # A TFDS data directory's dataset folder (versions inside) stays a TFDS name.
    os.makedirs(tmp_path / "cifar10" / "3.0.2")
    monkeypatch.chdir(tmp_path)
    assert not datasets.is_folder("cifar10")
