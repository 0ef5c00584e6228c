"""Specification of the input pipelines (train/data.py) and their transforms (train/augment.py)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from train import augment, data

RES = 32
BATCH = 64


def digits_epoch(**kwargs):
    args = dict(resolution=RES, global_batch_size=BATCH, seed=0, epoch=0) | kwargs
    return list(data.train_batches("digits", **args))


def concat(batches, key):
    return np.concatenate([b[key] for b in batches])


def denormalise(images):
    return images * augment.IMAGENET_STD + augment.IMAGENET_MEAN


# --- digits --------------------------------------------------------------------------------


def test_digits_split_is_80_20_stratified():
    info = data.dataset_info("digits")
    assert (info.num_classes, info.train_size, info.eval_size) == (10, 1437, 360)
    assert info.default_resolution == 32
    (eval_batch,) = data.eval_batches("digits", resolution=8, global_batch_size=360)
    counts = np.bincount(eval_batch["label"], minlength=10)
    # Stratified 20% of classes of 174..183 images is 34.8..36.6 per class; the rest is rounding.
    assert counts.min() >= 35 and counts.max() <= 37, counts


def test_digits_train_batches_are_normalised_nhwc_float32_with_int32_labels():
    batches = digits_epoch()
    assert len(batches) == data.steps_per_epoch("digits", BATCH) == 1437 // BATCH
    for batch in batches:
        assert batch["image"].shape == (BATCH, RES, RES, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
    pixels = denormalise(concat(batches, "image"))
    # Undoing the ImageNet normalisation gives back 0..255 pixels; 1e-3 is float32 rounding.
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    # Grey digits are replicated to three equal channels (same float32 rounding).
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-3)


def test_digits_epoch_is_a_permutation_of_the_training_split():
    (whole_epoch,) = digits_epoch(global_batch_size=1437)
    (eval_batch,) = data.eval_batches("digits", resolution=8, global_batch_size=360)
    all_digits = np.bincount(load_digits().target, minlength=10)
    train_split = all_digits - np.bincount(eval_batch["label"], minlength=10)
    np.testing.assert_array_equal(np.bincount(whole_epoch["label"], minlength=10), train_split)


def test_same_seed_and_epoch_give_identical_batches():
    first, second = digits_epoch(seed=3, epoch=1), digits_epoch(seed=3, epoch=1)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_each_epoch_is_shuffled_differently():
    labels = [concat(digits_epoch(epoch=epoch), "label") for epoch in (0, 1)]
    assert not np.array_equal(*labels)


def test_each_seed_is_shuffled_differently():
    labels = [concat(digits_epoch(seed=seed), "label") for seed in (0, 1)]
    assert not np.array_equal(*labels)


def test_resume_at_start_batch_yields_the_rest_of_the_uninterrupted_epoch():
    full = digits_epoch(epoch=2)
    resumed = digits_epoch(epoch=2, start_batch=7)
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_two_processes_local_batches_concatenate_to_the_global_batch():
    single = digits_epoch(epoch=1)
    shards = [digits_epoch(epoch=1, process_index=p, process_count=2) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for whole, part0, part1 in zip(single, *shards, strict=True):
        assert part0["image"].shape[0] == BATCH // 2
        for key in ("image", "label"):
            np.testing.assert_array_equal(whole[key], np.concatenate([part0[key], part1[key]]))


def test_digits_training_images_are_translated_copies_of_training_digits():
    # Translation only: a mirrored or rescaled digit would match no shift of any original.
    (epoch,) = digits_epoch(global_batch_size=1437)
    augmented = np.round(denormalise(epoch["image"][:16]))[..., 0].astype(np.uint8)
    originals, labels = data._digits_arrays(RES)["train"]
    pad = RES // data.PAD_DIVISOR
    padded = np.pad(originals[..., 0], ((0, 0), (pad, pad), (pad, pad)))
    # Every (example, shift) pair: [n, 2 * pad + 1, 2 * pad + 1, RES, RES].
    shifted = np.lib.stride_tricks.sliding_window_view(padded, (RES, RES), axis=(1, 2))
    for image, label in zip(augmented, epoch["label"][:16]):
        candidates = shifted[labels == label]
        matches = (candidates == image).all(axis=(-2, -1))
        assert matches.any(), "not a translation of a training digit"


def test_eval_batches_count_every_example_exactly_once():
    batches = list(data.eval_batches("digits", resolution=RES, global_batch_size=BATCH))
    assert len(batches) == -(-360 // BATCH)
    assert all(b["image"].shape == (BATCH, RES, RES, 3) for b in batches)
    mask = concat(batches, "mask")
    assert mask.dtype == np.float32 and mask.sum() == 360
    # Real examples first, padding last, and the real ones are the split in order.
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < 360)
    (unpadded,) = data.eval_batches("digits", resolution=RES, global_batch_size=360)
    np.testing.assert_array_equal(concat(batches, "label")[:360], unpadded["label"])
    np.testing.assert_array_equal(concat(batches, "image")[:360], unpadded["image"])


def test_eval_batches_of_two_processes_concatenate_to_the_global_batch():
    single = list(data.eval_batches("digits", resolution=RES, global_batch_size=BATCH))
    shards = [
        list(
            data.eval_batches(
                "digits", resolution=RES, global_batch_size=BATCH, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    for whole, part0, part1 in zip(single, *shards, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(whole[key], np.concatenate([part0[key], part1[key]]))


def test_batch_size_that_processes_cannot_divide_is_rejected():
    with pytest.raises(data.DataError, match="does not divide evenly over 3 processes"):
        digits_epoch(global_batch_size=64, process_count=3)


def test_batch_size_larger_than_the_training_split_is_rejected():
    with pytest.raises(data.DataError, match="1..1437"):
        data.steps_per_epoch("digits", 2048)


# --- transforms ----------------------------------------------------------------------------


def test_pad_and_random_crop_translates_by_at_most_pad_pixels():
    image = np.arange(1, 8 * 8 + 1, dtype=np.uint8).reshape(8, 8, 1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = augment.pad_and_random_crop(image, rng, pad=2)
        shifted = np.zeros((12, 12, 1), np.uint8)
        shifted[2:10, 2:10] = image
        shifts = [shifted[top : top + 8, left : left + 8] for top in range(5) for left in range(5)]
        assert any(np.array_equal(out, s) for s in shifts), "not a shifted copy of the input"


def test_center_crop_keeps_the_centre_0875_of_the_shorter_side():
    # A 64x128 image whose pixels hold their own coordinates (x in red, y in green): the crop
    # is the centred square of side 0.875 * 64 = 56, i.e. x in [36, 92), y in [4, 60), and
    # output pixel j samples x = 36 + (j + 0.5) * 56 / 16, where the ramp holds that x - 0.5
    # (pixel i covers [i, i + 1)).
    y, x = np.mgrid[0:64, 0:128]
    image = np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    out = augment.center_crop(image, 16).astype(np.float64)
    centres = (np.arange(16) + 0.5) * 56 / 16 - 0.5
    # Bilinear filtering reproduces a linear ramp; 0.5 is the rounding to uint8.
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(36 + centres, (16, 16)), atol=0.5)
    rows = np.broadcast_to(4 + centres[:, None], (16, 16))
    np.testing.assert_allclose(out[..., 1], rows, atol=0.5)


def test_random_resized_crop_gives_the_requested_size():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    assert all(augment.random_resized_crop(image, rng, 24).shape == (24, 24, 3) for _ in range(10))


# --- TFDS, on tfds.testing.mock_data -------------------------------------------------------


MOCK_EXAMPLES = 20


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


def test_tfds_dataset_info_comes_from_the_builder(mock_tfds):
    info = data.dataset_info("cifar10")
    names = tuple(tfds.builder("cifar10").info.features["label"].names)
    assert info == data.DatasetInfo("cifar10", 10, MOCK_EXAMPLES, MOCK_EXAMPLES, 32, names)
    assert data.dataset_info("imagenette").default_resolution == 224


@pytest.mark.parametrize("name", ["cifar10", "imagenette", "mnist"])
def test_tfds_train_batches_are_normalised_nhwc_float32(mock_tfds, name):
    batches = list(data.train_batches(name, resolution=24, global_batch_size=8, seed=0, epoch=0))
    assert len(batches) == MOCK_EXAMPLES // 8
    for batch in batches:
        assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    pixels = denormalise(concat(batches, "image"))
    # Back to 0..255 up to float32 rounding.
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_tfds_same_seed_and_epoch_give_identical_batches(mock_tfds):
    def epoch():
        return list(
            data.train_batches("imagenette", resolution=24, global_batch_size=8, seed=5, epoch=3)
        )

    for a, b in zip(epoch(), epoch(), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_eval_batches_count_every_example_exactly_once(mock_tfds):
    batches = list(data.eval_batches("cifar10", resolution=32, global_batch_size=8))
    assert [b["image"].shape for b in batches] == [(8, 32, 32, 3)] * 3
    np.testing.assert_array_equal(concat(batches, "mask"), np.arange(24) < MOCK_EXAMPLES)


def test_tfds_dataset_not_on_disk_names_the_command_that_prepares_it(tmp_path):
    with pytest.raises(data.DataError) as error:
        data.dataset_info("cifar10", data_dir=str(tmp_path))
    message = str(error.value)
    assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in message
    assert "\n" not in message


def test_unknown_dataset_name_lists_what_is_valid():
    expected = "unknown dataset 'no_such_dataset': expected 'digits' or the name of a TFDS"
    with pytest.raises(data.DataError, match=expected):
        data.dataset_info("no_such_dataset")


def test_tfds_dataset_without_images_is_rejected():
    with pytest.raises(data.DataError, match="not an image classification dataset"):
        data.dataset_info("imdb_reviews")
