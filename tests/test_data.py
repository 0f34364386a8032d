import gzip

import pytest
import torch

import mim4dd.data as data_module
from mim4dd.config import Config
from mim4dd.data import load_dataset
from mim4dd.datasets import DATASETS, DatasetError, canonical_dataset_name


def test_fashion_mnist_found_offline_from_debian_package(tmp_path, monkeypatch):
    if not data_module.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    monkeypatch.setattr(data_module, "DEFAULT_CACHE", tmp_path / "cache")
    data = load_dataset("fashionmnist", data_root=tmp_path / "empty", download=False)
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    ]
    assert len(data.train) + len(data.val) == 60_000 and len(data.test) == 10_000
    assert data.train.images.shape[1:] == (1, 28, 28)
    # Normalised with the standard statistics: roughly zero mean, unit std.
    assert abs(float(data.train.images.mean())) < 0.01
    assert abs(float(data.train.images.std()) - 1) < 0.01
    assert data.class_names[0] == "T-shirt/top"


def test_digits_are_scikit_learns_read_from_its_file():
    """The digits are read from scikit-learn's file without importing it: the same images and
    labels as `load_digits`, in the fixed 1,297 / 500 train / test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test, names = data_module._load_digits()
    images = torch.cat([train.images, test.images]) * DATASETS["digits"].std[0]
    images = images + DATASETS["digits"].mean[0]
    expected = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    index = torch.cat([order[500:].sort().values, order[:500].sort().values])
    assert (len(train), len(test), names) == (1297, 500, [str(d) for d in range(10)])
    torch.testing.assert_close(images, expected[index])
    assert torch.equal(torch.cat([train.labels, test.labels]), torch.tensor(bunch.target)[index])


def test_missing_dataset_names_dataset_roots_and_fix(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("CIFAR10", data_root=tmp_path, download=False)
    message = str(err.value)
    assert "CIFAR10 not found or unreadable" in message
    assert str(tmp_path) in message
    assert "How to get it" in message


def test_corrupt_dataset_is_a_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(DatasetError, match=f"MNIST not found or unreadable.*{tmp_path}"):
        load_dataset("MNIST", data_root=tmp_path, download=False)


def test_unknown_dataset_lists_allowed_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; allowed: MNIST, FashionMNIST"):
        canonical_dataset_name("imagenet")
    with pytest.raises(ValueError, match="allowed"):
        Config(dataset="imagenet")
    assert canonical_dataset_name("cifar-10") == "CIFAR10"


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for part, count in [("train", 6), ("test", 2)]:
        for cls in ["cat", "dog"]:
            folder = tmp_path / part / cls
            folder.mkdir(parents=True)
            for i in range(count):
                shade = 40 if cls == "cat" else 200
                Image.new("RGB", (12, 12), (shade, i * 10, 0)).save(folder / f"{i}.png")
    data = load_dataset("ImageFolder", data_root=tmp_path, val_fraction=0.0)
    assert data.class_names == ["cat", "dog"]
    assert data.train.images.shape == (12, 3, 12, 12) and len(data.test) == 4
    assert data.info.num_classes == 2 and data.info.channels == 3


def test_validation_split_is_stratified_disjoint_and_seeded(digits):
    again = load_dataset("digits", val_fraction=0.1, seed=0)
    other = load_dataset("digits", val_fraction=0.1, seed=1)
    assert torch.equal(digits.val.images, again.val.images)
    assert not torch.equal(digits.val.images, other.val.images)
    train_counts = torch.bincount(digits.train.labels, minlength=10)
    val_counts = torch.bincount(digits.val.labels, minlength=10)
    # 10 % of every class (floored), none shared with train.
    assert torch.equal(val_counts, ((train_counts + val_counts).float() * 0.1).long())
    flat = lambda x: {tuple(row.tolist()) for row in x.flatten(1)}  # noqa: E731
    assert not flat(digits.val.images) & flat(digits.train.images)


def test_per_class_sampling(digits):
    generator = torch.Generator().manual_seed(3)
    images, labels = digits.sample_per_class(7, generator)
    assert images.shape == (70, 1, 8, 8)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(7))
    index = digits.by_class.sample(7, torch.Generator().manual_seed(3))
    assert len(set(index.tolist())) == 70  # without replacement
    assert torch.equal(digits.train.labels[index], labels)
    again = digits.by_class.sample(7, torch.Generator().manual_seed(3))
    assert torch.equal(index, again)
    # Asking for more than the smallest class gives the whole smallest class, not duplicates.
    everything = digits.by_class.sample(10_000, torch.Generator().manual_seed(0))
    assert len(set(everything.tolist())) == len(everything)


def test_registry_statistics_match_the_design():
    assert DATASETS["FashionMNIST"].mean == (0.2861,)
    assert DATASETS["CIFAR10"].std == (0.2023, 0.1994, 0.2010)
    assert DATASETS["MNIST"].is_digits and not DATASETS["CIFAR10"].is_digits


def test_debian_files_are_valid_gzip():
    if not data_module.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    with gzip.open(data_module.DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x01"


def _unpack_after(barrier, packed, folder):
    barrier.wait()  # every process starts its first-use unpack at the same moment
    data_module.unpack_gz(packed, folder)


def test_concurrent_first_loaders_do_not_race(tmp_path):
    """Four processes unpack the same files into an empty cache at once (a sweep's first
    trials on a fresh machine): all succeed and every file is whole."""
    import multiprocessing as mp

    payload = torch.randint(0, 256, (8 << 20,), generator=torch.Generator().manual_seed(0),
                            dtype=torch.uint8).numpy().tobytes()  # incompressible: slow enough
    packed = []
    for name in ("a-ubyte", "b-ubyte"):
        packed.append(tmp_path / f"{name}.gz")
        with gzip.open(packed[-1], "wb", compresslevel=1) as out:
            out.write(payload)
    folder = tmp_path / "cache" / "raw"
    # Fresh processes, forked from one that has imported the engine once: spawning each would
    # import torch eight times (~2.4 s of CPU each).
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["mim4dd.data"])
    for _round in range(2):
        barrier = context.Barrier(4)
        workers = [context.Process(target=_unpack_after, args=(barrier, packed, folder))
                   for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
        assert sorted(p.name for p in folder.iterdir()) == ["a-ubyte", "b-ubyte"]  # no leftovers
        assert all((folder / n).read_bytes() == payload for n in ("a-ubyte", "b-ubyte"))
        for path in folder.iterdir():
            path.unlink()
