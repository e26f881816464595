"""Datasets: the validation carve-out, the loaders on fake files in the real on-disk formats, augmentation."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robust.data import (
    DATASETS,
    ImageSplit,
    augment_batch,
    create_dataset,
    dataset_eps,
    dataset_names,
    make_synthetic,
)
from robust.registry import UnknownNameError

FILE_FREE = {"digits", "synthetic"}  # datasets that need no data directory


# ---------------------------------------------------------------------------
# Fake datasets in the real on-disk formats.  Each writer returns the source
# arrays it wrote: train images uint8 (N, C, H, W), train labels, test images,
# test labels, in the order the files hold them.
# ---------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    # torchvision unpickles with encoding="latin1", under which the byte-string
    # keys of the real (Python 2) CIFAR pickles arrive as str; a Python 3 pickle
    # must therefore use str keys ("data", "labels") to be read the same way.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for b in range(1, 6):
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # each row: R plane, G plane, B plane
        labels = rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "data": rows, "labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": test_rows, "labels": test_labels})
    _pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072})
    return (np.concatenate(train_rows).reshape(-1, 3, 32, 32), np.array(train_labels),
            test_rows.reshape(-1, 3, 32, 32), np.array(test_labels))


def write_fake_cifar100(root: Path, n_train: int = 20, n_test: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = []
    for filename, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        _pickle(folder / filename, {"data": rows, "fine_labels": fine, "coarse_labels": [c // 5 for c in fine]})
        arrays += [rows.reshape(-1, 3, 32, 32), np.array(fine)]
    _pickle(folder / "meta", {"fine_label_names": [f"f{c}" for c in range(100)], "coarse_label_names": [f"c{c}" for c in range(20)]})
    return tuple(arrays)


def write_fake_svhn(root: Path, n_train: int = 20, n_test: int = 6, seed: int = 2):
    import scipy.io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = []
    for filename, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        digits = rng.integers(0, 10, n)
        # SVHN's .mat files: X is (H, W, C, N) and the digit 0 has label 10.
        scipy.io.savemat(root / filename, {"X": images.transpose(2, 3, 1, 0), "y": np.where(digits == 0, 10, digits)[:, None].astype(np.uint8)})
        arrays += [images, digits]
    return tuple(arrays)


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX format: magic (0, 0, type 0x08 = uint8, number of dims), big-endian dims, then the bytes.
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _mnist_writer(folder_name: str, seed: int):
    def write(root: Path, n_train: int = 20, n_test: int = 6):
        rng = np.random.default_rng(seed)
        raw = root / folder_name / "raw"
        raw.mkdir(parents=True)
        arrays = []
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n).astype(np.uint8)
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
            arrays += [images[:, None], labels.astype(np.int64)]
        return tuple(arrays)

    return write


FAKE_WRITERS = {
    "cifar10": write_fake_cifar10,
    "cifar100": write_fake_cifar100,
    "svhn": write_fake_svhn,
    "mnist": _mnist_writer("MNIST", seed=3),
    "fashion-mnist": _mnist_writer("FashionMNIST", seed=4),
}


def assert_round_trip(split: ImageSplit, images: np.ndarray, labels: np.ndarray) -> None:
    """Every example of split is exactly the source example at its index: bytes, [0,1] floats and label."""
    expected = torch.from_numpy(images)[split.indices]
    assert split.images.dtype == torch.uint8
    assert torch.equal(split.images, expected)
    x, y, _ = split.batch(torch.arange(len(split)))
    assert torch.equal(x, expected.float() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long()[split.indices])


# ---------------------------------------------------------------------------
# Registry contract
# ---------------------------------------------------------------------------


def test_every_dataset_has_consistent_constants_and_a_test_loader():
    assert set(dataset_names()) == FILE_FREE | set(FAKE_WRITERS), "a new dataset needs a fake writer in this file"
    for name in dataset_names():
        spec = DATASETS.get(name)
        assert len(spec.mean) == len(spec.std) == spec.in_channels
        assert all(0 < m < 1 for m in spec.mean) and all(0 < s < 1 for s in spec.std)
        assert 0 < spec.eps < 0.5
        assert spec.augment in (None, "crop", "crop-flip")


def test_documented_budgets_and_augmentations():
    assert dataset_eps("cifar10") == dataset_eps("cifar100") == dataset_eps("svhn") == pytest.approx(8 / 255)
    assert dataset_eps("mnist") == 0.3 and dataset_eps("fashion-mnist") == 0.1 and dataset_eps("digits") == 0.1
    augments = {name: DATASETS.get(name).augment for name in dataset_names()}
    assert augments["cifar10"] == augments["cifar100"] == "crop-flip"
    assert augments["svhn"] == "crop"  # house numbers must not be mirrored
    assert augments["mnist"] is augments["fashion-mnist"] is augments["digits"] is None


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError) as excinfo:
        create_dataset("imagenet-1k")
    for name in dataset_names():
        assert name in str(excinfo.value)
    with pytest.raises(UnknownNameError):
        dataset_eps("imagenet-1k")


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits")


def test_digits_loads_without_network(digits):
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert (len(digits.train) + len(digits.val), len(digits.test)) == (1437, 360)  # fixed stratified 20% test
    per_class = torch.bincount(torch.cat([digits.train.labels, digits.val.labels, digits.test.labels]))
    assert (torch.bincount(digits.test.labels) - 0.2 * per_class).abs().max() <= 1  # stratified
    # The grey levels are k/16, k = 0..16.
    levels = torch.cat([digits.train.images, digits.val.images]).flatten() * 16
    assert torch.equal(levels, levels.round()) and levels.max() == 16
    # The documented Normalize constants are those of the source training split.
    assert levels.mean().item() / 16 == pytest.approx(digits.mean[0], abs=1e-4)
    assert (levels / 16).std(correction=0).item() == pytest.approx(digits.std[0], abs=1e-4)


def test_val_carve_out_sizes_and_disjointness(digits):
    n_source = 1437
    assert len(digits.val) == round(0.1 * n_source) and len(digits.train) == n_source - len(digits.val)
    train, val = set(digits.train.indices.tolist()), set(digits.val.indices.tolist())
    assert not train & val
    assert train | val == set(range(n_source))
    assert torch.equal(digits.test.indices, torch.arange(len(digits.test)))


def test_split_seed_fixes_the_carve_out(digits):
    same = create_dataset("digits", split_seed=0)
    assert torch.equal(same.val.indices, digits.val.indices)
    assert torch.equal(same.train.images, digits.train.images)
    other = create_dataset("digits", split_seed=1)
    assert set(other.val.indices.tolist()) != set(digits.val.indices.tolist())
    assert torch.equal(other.test.images, digits.test.images)  # the test split never moves


def test_max_train_keeps_the_first_examples_of_the_permutation(digits):
    small = create_dataset("digits", max_train=100)
    assert torch.equal(small.train.indices, digits.train.indices[:100])
    assert torch.equal(small.val.indices, digits.val.indices)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_open_unit_interval_is_rejected_before_loading(tmp_path, val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        # cifar10 has no files in tmp_path: the check must come first.
        create_dataset("cifar10", data_dir=tmp_path, download=False, val_fraction=val_fraction)


def test_items_are_float_images_in_unit_range_and_batch_equals_stacked_items(digits):
    split = digits.val
    positions = torch.tensor([5, 0, 17, 5])
    x, y, idx = split.batch(positions)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert 0 <= x.min() and x.max() <= 1
    items = [split[int(p)] for p in positions]
    assert torch.equal(x, torch.stack([item[0] for item in items]))
    assert torch.equal(y, torch.stack([item[1] for item in items]))
    assert torch.equal(idx, torch.stack([item[2] for item in items]))
    assert items[0][1].dtype == items[0][2].dtype == torch.int64 and items[0][1].dim() == 0


def test_items_are_copies_that_callers_may_perturb_in_place(digits):
    before = digits.val.images.clone()
    digits.val[0][0].add_(1.0)
    digits.val.batch([0, 1])[0].add_(1.0)
    assert torch.equal(digits.val.images, before)


def test_subset_keeps_source_indices(digits):
    sub = digits.train.subset([3, 1])
    assert torch.equal(sub.indices, digits.train.indices[[3, 1]])
    assert torch.equal(sub.batch([0, 1])[0], digits.train.batch([3, 1])[0])


def test_synthetic_is_deterministic_and_learnable():
    a, b = create_dataset("synthetic"), create_dataset("synthetic")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert (len(a.train) + len(a.val), len(a.test), a.in_channels, a.image_size) == (600, 200, 1, 8)
    assert 0 <= a.train.images.min() and a.train.images.max() <= 1
    # Nearest class mean, fitted on train, classifies the test split almost perfectly.
    means = torch.stack([a.train.images[a.train.labels == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(a.test.images.flatten(1), means).argmin(1)
    assert (predicted == a.test.labels).float().mean() > 0.95


def test_make_synthetic_builds_other_shapes():
    splits = make_synthetic(in_channels=3, image_size=32, n_train=50, n_test=20, augment="crop-flip")
    assert splits.train.images.shape[1:] == (3, 32, 32) and len(splits.mean) == 3
    assert len(splits.train) + len(splits.val) == 50 and splits.augment == "crop-flip"


# ---------------------------------------------------------------------------
# torchvision loaders on fake files
# ---------------------------------------------------------------------------


def test_cifar10_loader_round_trips_pixels_and_labels(tmp_path):
    train_images, train_labels, test_images, test_labels = write_fake_cifar10(tmp_path)
    splits = create_dataset("cifar10", data_dir=tmp_path, download=False, verify_checksums=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)
    assert sorted(splits.train.indices.tolist() + splits.val.indices.tolist()) == list(range(20))
    assert_round_trip(splits.train, train_images, train_labels)
    assert_round_trip(splits.val, train_images, train_labels)
    assert_round_trip(splits.test, test_images, test_labels)
    # One pixel by hand: channel 1 (green), row 2, column 5 is byte 1024 + 2 * 32 + 5 of the row.
    position = int(splits.train.indices[0])
    row = train_images.reshape(-1, 3072)[position]
    assert splits.train[0][0][1, 2, 5].item() == np.float32(row[1024 + 2 * 32 + 5]) / np.float32(255)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert splits.mean == (0.4914, 0.4822, 0.4465) and splits.eps == pytest.approx(8 / 255)


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="checksum"):
        create_dataset("cifar10", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("name", sorted(FAKE_WRITERS))
def test_torchvision_loader_round_trips_fake_files(tmp_path, name):
    train_images, train_labels, test_images, test_labels = FAKE_WRITERS[name](tmp_path)
    splits = create_dataset(name, data_dir=tmp_path, download=False, verify_checksums=False, split_seed=3)
    assert len(splits.train) + len(splits.val) == len(train_images)
    for split in (splits.train, splits.val):
        assert_round_trip(split, train_images, train_labels)
    assert_round_trip(splits.test, test_images, test_labels)


def test_download_skips_present_files_and_takes_the_lock(tmp_path):
    # No network here: download=True must find the files and not fetch anything.
    train_images, train_labels, _, _ = write_fake_cifar10(tmp_path)
    splits = create_dataset("cifar10", data_dir=tmp_path, download=True, verify_checksums=False)
    assert_round_trip(splits.train, train_images, train_labels)
    assert (tmp_path / ".cifar10.lock").exists()


def test_download_lock_is_exclusive(tmp_path):
    import fcntl

    from robust.data.torchvision_datasets import download_lock

    with download_lock(tmp_path, "cifar10"):
        with open(tmp_path / ".cifar10.lock") as other:  # a second open file, as another worker has
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".cifar10.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


@pytest.mark.parametrize("name", sorted(FAKE_WRITERS))
def test_missing_files_name_the_dataset_and_directory(tmp_path, name):
    missing = tmp_path / "no-data-here"
    with pytest.raises(FileNotFoundError) as excinfo:
        create_dataset(name, data_dir=missing, download=False)
    assert name in str(excinfo.value) and str(missing) in str(excinfo.value)
    assert not missing.exists()  # download=False writes nothing


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def _candidates(image: torch.Tensor, padding: int, flips: bool) -> list:
    """Every crop of the zero-padded image (and its mirror image when flips), as (dy, dx, flipped, crop)."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out.append((dy, dx, False, crop))
            if flips:
                out.append((dy, dx, True, crop.flip(-1)))
    return out


@pytest.mark.parametrize("kind", ["crop-flip", "crop"])
def test_augmentation_is_a_padded_shift_of_the_original(kind):
    x = torch.rand(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, kind, generator=torch.Generator().manual_seed(1), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    draws = []
    for image, augmented in zip(x, out):
        matches = [(dy, dx, f) for dy, dx, f, crop in _candidates(image, 2, flips=True) if torch.equal(crop, augmented)]
        assert len(matches) == 1  # random pixels: exactly one crop/flip explains the output
        draws.append(matches[0])
    flipped = sum(f for _, _, f in draws)
    if kind == "crop":
        assert flipped == 0
    else:
        assert 70 < flipped < 130  # p = 0.5 over 200 images
    assert {dy for dy, _, _ in draws} == set(range(5)) and {dx for _, dx, _ in draws} == set(range(5))


def test_one_crop_flip_example_exactly():
    # A 1x4x4 ramp; with padding 1, an output showing the row-shifted, mirrored ramp is checked by hand.
    x = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4) / 16
    out = augment_batch(x.expand(64, 1, 4, 4), "crop-flip", generator=torch.Generator().manual_seed(0), padding=1)
    padded = F.pad(x[0], (1, 1, 1, 1))
    # Shift down by one row (dy = 0 takes the zero row on top), no horizontal shift (dx = 1), mirrored.
    expected = torch.stack([torch.zeros(4), *(x[0, 0, :3].flip(-1))])[None]
    assert torch.equal(expected, padded[:, 0:4, 1:5].flip(-1))
    assert any(torch.equal(o, expected) for o in out)


def test_augmentation_is_deterministic_given_the_generator():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = augment_batch(x, "crop-flip", generator=torch.Generator().manual_seed(7))
    again = augment_batch(x, "crop-flip", generator=torch.Generator().manual_seed(7))
    other = augment_batch(x, "crop-flip", generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_cuda_with_a_cpu_generator_matches_cpu():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on_cpu = augment_batch(x, "crop-flip", generator=torch.Generator().manual_seed(7))
    on_cuda = augment_batch(x.cuda(), "crop-flip", generator=torch.Generator().manual_seed(7))
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), on_cpu)
    assert augment_batch(x.cuda(), "crop").device.type == "cuda"  # no generator: draws on x's device


def test_no_augmentation_is_identity_and_unknown_kind_is_rejected():
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(augment_batch(x, None), x)
    with pytest.raises(ValueError, match="crop-flip"):
        augment_batch(x, "rotate")
