"""Datasets: offline discovery, train/val/test tensors and per-class sampling (the registry of
names and statistics is `mim4dd.datasets`).

Every dataset is held in memory as normalised float tensors (the largest, CIFAR-100, is
600 MB), because distillation samples a few hundred images per class every iteration and a
DataLoader would spend more time than the model.

With ZCA whitening (`zca=True`, MTT's preprocessing) every split is returned whitened instead,
by one transform fitted on the train split's pixels only, so everything downstream (distillation,
evaluation, experts) runs in that space; `RealData.zca` holds the transform.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mim4dd.atomic import write_atomic
from mim4dd.datasets import (
    DATASETS, DEBIAN_FASHION_MNIST, DatasetError, DatasetInfo, canonical_dataset_name,
)
from mim4dd.zca import ZCA

OFFLINE_ENV = "MIM4DD_OFFLINE"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mim4dd" / "data"


@dataclass
class Split:
    images: torch.Tensor  # N x C x H x W float32, normalised (ZCA-whitened when data.zca is set)
    labels: torch.Tensor  # N, int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RealData:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    root: Path | None = None
    zca: ZCA | None = field(default=None, repr=False)  # set when the splits are whitened
    _class_index: ClassIndex | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.info.channels, self.info.image_size, self.info.image_size)

    @property
    def by_class(self) -> ClassIndex:
        if self._class_index is None:
            self._class_index = ClassIndex(self.train.labels, self.num_classes)
        return self._class_index

    def sample_per_class(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n train images of every class (without replacement), grouped class by class."""
        index = self.by_class.sample(n, generator)
        return self.train.images[index], self.train.labels[index]

    def ipc_problem(self, ipc: int) -> str | None:
        """Why `ipc` real training images per class cannot start a set; None when they can."""
        smallest = self.by_class.smallest
        if smallest >= ipc:
            return None
        return (f"ipc={ipc} needs at least that many training images per class; the smallest "
                f"class of {self.info.name} has {smallest} (use init: noise)")

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images of this data's space back to pixels (roughly [0, 1]): un-whitened under ZCA."""
        if self.zca is not None:
            return self.zca.unwhiten(images)
        mean = torch.tensor(self.info.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=images.device).view(1, -1, 1, 1)
        return images * std + mean


class ClassIndex:
    """Train indices sorted by class, so a per-class batch is one tensor operation."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        if (self.counts == 0).any():
            missing = torch.nonzero(self.counts == 0).flatten().tolist()
            raise DatasetError(f"classes {missing} have no training images")
        # Read once here, not at every step's sample (a read-back per call).
        self.smallest, self.widest = int(self.counts.min()), int(self.counts.max())

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of n distinct images per class (fewer if a class is smaller), class-major."""
        n = min(n, self.smallest)
        num_classes, widest = len(self.counts), self.widest
        # Random keys; positions past a class's count get +inf so they are never picked.
        keys = torch.rand(num_classes, widest, generator=generator)
        beyond = torch.arange(widest).unsqueeze(0) >= self.counts.unsqueeze(1)
        keys = keys.masked_fill(beyond, float("inf"))
        picks = torch.topk(keys, n, dim=1, largest=False).indices  # C x n
        return self.order[(self.starts.unsqueeze(1) + picks).flatten()]


def candidate_roots(data_root: str | os.PathLike | None) -> list[Path]:
    roots = []
    if data_root:
        roots.append(Path(data_root).expanduser())
    if os.environ.get("MIM4DD_DATA"):
        roots.append(Path(os.environ["MIM4DD_DATA"]).expanduser())
    roots.append(DEFAULT_CACHE)
    return list(dict.fromkeys(roots))


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    zca: bool = False,
) -> RealData:
    """Load train/val/test tensors. The validation split is held out of train with `seed`;
    with `zca`, every split is whitened (`whitened`). Nothing is downloaded when `download`
    is False or $MIM4DD_OFFLINE is set (air-gapped machines: a missing dataset is then an
    error naming how to get it)."""
    download = download and not os.environ.get(OFFLINE_ENV)
    info = DATASETS[canonical_dataset_name(name)]
    roots = candidate_roots(data_root)
    if info.name == "digits":
        train, test, class_names = _load_digits()
        root = None
    elif info.name == "ImageFolder":
        if not data_root:
            raise DatasetError("dataset 'ImageFolder' needs data_root: " + info.how_to_get)
        train, test, class_names, info = _load_image_folder(Path(data_root).expanduser())
        root = Path(data_root)
    else:
        train, test, class_names, root = _load_torchvision(info, roots, download)
        train = _normalise(train, info)
        test = _normalise(test, info)
    train, val = _hold_out(train, info.num_classes, val_fraction, seed)
    data = RealData(info, train, val, test, class_names, root)
    return whitened(data) if zca else data


def whitened(data: RealData, transform: ZCA | None = None) -> RealData:
    """`data` with every split ZCA-whitened by one transform fitted on the train split alone
    (validation and test never shape it), or by `transform` (a saved set's, to evaluate it in
    exactly its own space). As in MTT, the fit and the whitening see pixels in [0, 1], not
    mean/std-normalised values: eps = 0.1 is calibrated for that scale."""
    if data.zca is not None:
        raise ValueError("data is whitened already")
    if transform is None:
        transform = ZCA.fit(data.denormalise(data.train.images))

    def whiten(split: Split) -> Split:
        return Split(transform.whiten(data.denormalise(split.images)), split.labels)

    return replace(data, train=whiten(data.train), val=whiten(data.val), test=whiten(data.test),
                   zca=transform, _class_index=None)


def load_for(config) -> RealData:
    """The data a `Config` names (duck-typed: the config module imports this one)."""
    return load_dataset(config.dataset, config.data_root, config.val_fraction, config.split_seed,
                        zca=config.zca)


def load_once(config, loaded: dict, download: bool = True) -> RealData | Exception:
    """The config's data from `loaded`, where each distinct dataset, split and space is loaded
    once (a stage checking many trials); the exception, not raised, when it cannot be loaded."""
    what = (config.dataset, config.data_root, config.val_fraction, config.split_seed)
    key = (*what, config.zca)
    if key not in loaded:
        try:
            loaded[key] = load_dataset(*what, download=download, zca=config.zca)
        except Exception as exc:  # DatasetError, or a broken download: the caller reports it
            loaded[key] = exc
    return loaded[key]


def _normalise(split: Split, info: DatasetInfo) -> Split:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return Split((split.images - mean) / std, split.labels)


def _hold_out(train: Split, num_classes: int, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded validation split: the same fraction of every class."""
    if fraction <= 0:
        empty = Split(train.images[:0], train.labels[:0])
        return train, empty
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(train), generator=generator)
    by_class = shuffled[torch.argsort(train.labels[shuffled], stable=True)]
    counts = torch.bincount(train.labels, minlength=num_classes)
    rank_in_class = torch.arange(len(train)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    is_val = rank_in_class < (counts.float() * fraction).long().repeat_interleave(counts)
    val_idx, train_idx = by_class[is_val].sort().values, by_class[~is_val].sort().values
    return (
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
    )


def _to_float_images(array: np.ndarray | torch.Tensor, channels_last: bool) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(array))
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif channels_last:
        images = images.permute(0, 3, 1, 2)
    return images.float().div_(255.0).contiguous()


def _debian_fashion_mnist(cache: Path) -> Path | None:
    """Gunzip Debian's Fashion-MNIST into torchvision's raw layout (its md5 check rejects .gz)."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        return None
    unpack_gz(sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")), cache / "FashionMNIST" / "raw")
    return cache


def unpack_gz(packed: list[Path], folder: Path) -> None:
    """Gunzip each file into `folder` unless there already. Every writer uses its own temporary
    name and renames it into place, so processes loading at once (a sweep's first trials)
    never share a half-written file, and a reader never sees one."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in packed:
        target = folder / source.name.removesuffix(".gz")
        if not target.exists():
            write_atomic(target, lambda tmp, source=source: _gunzip(source, tmp))


def _gunzip(source: Path, target: Path) -> None:
    with gzip.open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _load_torchvision(info: DatasetInfo, roots: list[Path], download: bool):
    from torchvision import datasets

    cls = getattr(datasets, info.name)

    def open_split(root: Path, train: bool, allow_download: bool):
        if info.name == "SVHN":
            return cls(str(root), split="train" if train else "test", download=allow_download)
        return cls(str(root), train=train, download=allow_download)

    tried = list(roots)
    if info.name == "FashionMNIST":
        debian = _debian_fashion_mnist(DEFAULT_CACHE)
        if debian is not None:
            tried.append(DEBIAN_FASHION_MNIST)
            roots = [*roots, debian]
    errors: list[str] = []
    for root in list(dict.fromkeys(roots)):
        try:
            train_set, test_set = open_split(root, True, False), open_split(root, False, False)
            break
        except Exception as exc:  # noqa: BLE001 - any failure to read a root is reported
            errors.append(f"{root}: {_summary(exc)}")
    else:
        if download:
            root = roots[0]
            try:
                train_set, test_set = open_split(root, True, True), open_split(root, False, True)
            except Exception as exc:  # noqa: BLE001 - any download failure is reported the same way
                errors.append(f"download into {root}: {_summary(exc)}")
                train_set = None
        else:
            train_set = None
        if train_set is None:
            raise DatasetError(
                f"dataset {info.name} not found or unreadable. Roots tried: {', '.join(map(str, tried))}.\n"
                f"How to get it: {info.how_to_get}.\nDetails:\n  " + "\n  ".join(errors)
            )
    splits = []
    for ds in (train_set, test_set):
        labels = ds.labels if info.name == "SVHN" else ds.targets
        channels_last = info.name.startswith("CIFAR")
        images = _to_float_images(ds.data, channels_last)
        splits.append(Split(images, torch.as_tensor(np.asarray(labels), dtype=torch.long)))
    class_names = list(getattr(train_set, "classes", [str(c) for c in range(info.num_classes)]))
    return splits[0], splits[1], class_names, root


def _summary(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def digits_file() -> Path:
    """scikit-learn's copy of the UCI digits (`load_digits` reads it): 1,797 rows of 64 pixels
    (0-16) and the label. Found, not imported: importing scikit-learn costs every trial process
    ~0.5 s of CPU."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("dataset digits needs scikit-learn: pip install scikit-learn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def _load_digits() -> tuple[Split, Split, list[str]]:
    rows = torch.from_numpy(np.loadtxt(digits_file(), delimiter=",", dtype=np.float32))
    images = rows[:, :-1].reshape(-1, 1, 8, 8) / 16.0
    labels = rows[:, -1].long()
    info = DATASETS["digits"]
    normalised = _normalise(Split(images, labels), info)
    # Fixed split (the set has none): 500 images, seed 0, are the test split forever.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = order[:500].sort().values, order[500:].sort().values
    split = lambda idx: Split(normalised.images[idx], normalised.labels[idx])  # noqa: E731
    return split(train_idx), split(test_idx), [str(d) for d in range(10)]


def _load_image_folder(root: Path) -> tuple[Split, Split, list[str], DatasetInfo]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetError(f"ImageFolder root {root} lacks train/ and test/ folders")
    raw = []
    for part in ("train", "test"):
        folder = ImageFolder(str(root / part))
        images = torch.stack([pil_to_tensor(img) for img, _ in folder]).float() / 255.0
        raw.append(Split(images, torch.tensor(folder.targets, dtype=torch.long)))
        if part == "train":
            classes = folder.classes
    channels, height, width = raw[0].images.shape[1:]
    if height != width:
        raise DatasetError(f"ImageFolder images must be square, got {height}x{width}")
    mean = tuple(raw[0].images.mean(dim=(0, 2, 3)).tolist())
    std = tuple(raw[0].images.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
    info = DatasetInfo("ImageFolder", channels, height, len(classes), mean, std, False, "")
    return _normalise(raw[0], info), _normalise(raw[1], info), classes, info
