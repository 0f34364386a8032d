"""Shared fixtures: tiny real datasets, loaded once per test session."""

from __future__ import annotations

import os

import pytest

from mim4dd.config import Config
from mim4dd.data import DEBIAN_FASHION_MNIST, load_dataset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits: real, offline, 1,172 train / 125 val / 500 test images."""
    return load_dataset("digits", val_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST from Debian's dataset-fashion-mnist package (CI installs it)."""
    if not DEBIAN_FASHION_MNIST.is_dir() and not os.environ.get("CI"):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return load_dataset("FashionMNIST", val_fraction=0.1, seed=0)


def tiny_config(**overrides) -> Config:
    """A distillation that takes well under a second per step on the digits."""
    base = dict(
        dataset="digits", ipc=2, iterations=4, batch_real=16, lam=0.8, seed=0,
        model={"width": 8}, eval={"epochs": 3, "num_nets": 2, "batch_size": 64},
    )
    base.update(overrides)
    return Config.model_validate(base)
