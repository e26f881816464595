"""scikit-learn's handwritten digits: the embedded dataset (ships inside sklearn, no download).

1,797 grayscale 8x8 images with 17 grey levels (0..16), 10 classes.  Pixels are
divided by 16 to land in [0, 1] and kept as float32 (the whole set is 460 kB).

Test split: the dataset has no official one, so we hold out a fixed stratified
20% (``sklearn.model_selection.train_test_split(test_size=0.2, random_state=0,
stratify=y)``, 360 images).  The other 1,437 images, in their original order,
are the source training split from which the validation split is carved.

eps_data = 0.1 (L-inf, pixel scale [0, 1]) is our choice, not a value from a
paper: 0.1 is about 1.6 of the 17 grey levels, a budget at which a small CNN
goes from ~97% clean accuracy to a meaningful but not zero PGD accuracy, so the
defenses can be told apart on a laptop.

mean/std: measured on the 1,437 source training images after /16 (a single
grey channel): mean 0.3054, std 0.3761.
"""
from __future__ import annotations

from pathlib import Path

import torch

from robust.data.base import SourceData, register_dataset

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0


@register_dataset(
    "digits", num_classes=10, in_channels=1, image_size=8,
    mean=(0.3054,), std=(0.3761,), eps=0.1, augment=None, train_size=1437, test_size=360,
)
def digits(data_dir: Path, download: bool, verify_checksums: bool) -> SourceData:
    """Load sklearn's digits; data_dir, download and verify_checksums do not apply (the data is in the package)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.data / 16.0).to(torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    train_pos, test_pos = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=TEST_SPLIT_SEED, stratify=bunch.target
    )
    train_pos = torch.from_numpy(np.sort(train_pos))
    test_pos = torch.from_numpy(np.sort(test_pos))
    return SourceData(images[train_pos], labels[train_pos], images[test_pos], labels[test_pos])
