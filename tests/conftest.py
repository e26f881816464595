"""Shared fixtures: a small model trained once per session on the embedded digits."""
from __future__ import annotations

import pytest
import torch

from robust.data import create_dataset
from robust.defenses import create_defense
from robust.models import create_model
from robust.train import TrainConfig, fit


@pytest.fixture(scope="session")
def digits():
    return create_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_model(digits):
    """small-cnn trained 3 epochs on digits with plain training (about 10 s on 2 cores)."""
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8,
                         mean=digits.mean, std=digits.std)
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                      schedule="cosine", val_attack_steps=5)
    module, _ = fit(model, create_defense("standard", eps_data=digits.eps), digits, cfg, seed=0,
                    device=torch.device("cpu"))
    return module.eval()


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance shared by every actor test (never `ray stop`)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny forward passes: one thread is fastest on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
