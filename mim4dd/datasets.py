"""The dataset registry: names, shapes, normalisation statistics and how to get each one.

Torch-free, so that validating a config or a sweep file (and every read command of the sweep
service) does not import torch; `mim4dd.data` loads the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    is_digits: bool  # flipping changes a digit's meaning, so DSA drops flip
    how_to_get: str


_TORCHVISION_HINT = (
    "run once with network access (it downloads into the data root), or copy the "
    "torchvision-layout files into one of the roots"
)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo("MNIST", 1, 28, 10, (0.1307,), (0.3081,), True, _TORCHVISION_HINT),
        DatasetInfo(
            "FashionMNIST", 1, 28, 10, (0.2861,), (0.3530,), False,
            "install Debian's package: `sudo apt-get install dataset-fashion-mnist` (found "
            f"automatically in {DEBIAN_FASHION_MNIST}), or " + _TORCHVISION_HINT,
        ),
        DatasetInfo(
            "SVHN", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), True,
            _TORCHVISION_HINT,
        ),
        DatasetInfo(
            "CIFAR10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), False,
            _TORCHVISION_HINT,
        ),
        DatasetInfo(
            "CIFAR100", 3, 32, 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), False,
            _TORCHVISION_HINT,
        ),
        # scikit-learn's bundled 8x8 handwritten digits: real, tiny and always offline.
        DatasetInfo("digits", 1, 8, 10, (0.3047,), (0.3781,), True, "pip install scikit-learn"),
        # Folder-of-class-folders: data_root/train/<class>/*.png and data_root/test/<class>/*.png.
        # Shape and statistics are read from the files.
        DatasetInfo(
            "ImageFolder", 0, 0, 0, (), (), False,
            "point data_root at a folder holding train/<class>/ and test/<class>/ image folders",
        ),
    ]
}


class DatasetError(RuntimeError):
    """A dataset could not be found or read; the message says where we looked and what to do."""


def canonical_dataset_name(name: str) -> str:
    """Case-insensitive lookup, so `cifar10` and `CIFAR10` are the same dataset."""
    by_lower = {key.lower(): key for key in DATASETS}
    key = by_lower.get(name.lower().replace("-", "").replace("_", ""))
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return key


__all__ = ["DATASETS", "DEBIAN_FASHION_MNIST", "DatasetError", "DatasetInfo",
           "canonical_dataset_name"]
