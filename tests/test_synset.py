"""Synthetic-set packaging: round trip, integrity checks, grid image, no pickle on load."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mim4dd.synset import (
    FORMAT_VERSION,
    GRID_FILE,
    GRID_LABEL_GAP,
    MANIFEST_FILE,
    TENSORS_FILE,
    SyntheticSet,
    SyntheticSetError,
    grid_size,
)

CLASSES = ["cat", "dog", "frog"]


def make_set(ipc: int = 2, channels: int = 3, size: int = 8, lr=None, **kw) -> SyntheticSet:
    gen = torch.Generator().manual_seed(0)
    n = ipc * len(CLASSES)
    images = torch.randn(n, channels, size, size, generator=gen)
    labels = torch.arange(len(CLASSES)).repeat_interleave(ipc)
    return SyntheticSet.create(
        images,
        labels,
        dataset="Toy",
        class_names=CLASSES,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        config={"ipc": ipc, "lam": 0.8, "model": {"width": 16}},
        eval_protocol={"epochs": 3, "num_nets": 1},
        lr=lr,
        **kw,
    )


def edit_manifest(directory: Path, edit) -> None:
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_create_builds_manifest():
    synset = make_set(extra={"note": "hi"})
    m = synset.manifest
    assert m["format_version"] == FORMAT_VERSION
    assert m["dataset"] == "Toy" and m["class_names"] == CLASSES and m["num_classes"] == 3
    assert m["ipc"] == 2 and m["image_shape"] == [3, 8, 8]
    assert m["normalisation"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert m["config"]["lam"] == 0.8 and m["eval_protocol"]["epochs"] == 3
    assert set(m["versions"]) == {"mim4dd", "torch", "torchvision", "python"}
    assert m["created"].endswith("+00:00") and m["note"] == "hi"
    assert (synset.ipc, synset.num_classes, synset.image_shape) == (2, 3, (3, 8, 8))
    json.dumps(m)  # JSON-able as promised


def test_a_set_prints_what_it_is():
    classes = len(CLASSES)
    assert str(make_set(ipc=2)) == (
        f"Toy synthetic set: {classes} classes, 2 images per class, 3×8×8 (lam 0.8)")
    assert str(make_set(ipc=1, channels=1, lr=0.02)).startswith(
        f"Toy synthetic set: {classes} classes, 1 image per class, 1×8×8, learned lr 0.02")


def test_create_detaches_and_rejects_bad_input():
    images = torch.randn(6, 1, 8, 8, requires_grad=True)
    labels = torch.arange(3).repeat_interleave(2).int()
    kw = dict(dataset="Toy", class_names=CLASSES, mean=(0.0,), std=(1.0,), config={},
              eval_protocol={})
    synset = SyntheticSet.create(images, labels, **kw)
    assert not synset.images.requires_grad and synset.labels.dtype == torch.int64
    with torch.no_grad():
        images.add_(1.0)  # the distillation keeps optimising its own tensor
    assert not torch.equal(synset.images, images.detach())
    with pytest.raises(SyntheticSetError, match="each class"):
        SyntheticSet.create(images, torch.tensor([0, 0, 0, 1, 1, 2]), **kw)
    with pytest.raises(SyntheticSetError, match=r"\[0, 3\)"):
        SyntheticSet.create(images, torch.tensor([0, 0, 1, 1, 2, 3]), **kw)
    with pytest.raises(SyntheticSetError, match="mean/std"):
        SyntheticSet.create(images, labels, **{**kw, "mean": (0.0, 0.0)})
    with pytest.raises(SyntheticSetError, match="JSON"):
        SyntheticSet.create(images, labels, **{**kw, "config": {"path": Path(".")}})
    with pytest.raises(SyntheticSetError, match="override"):
        SyntheticSet.create(images, labels, **kw, extra={"ipc": 5})


def test_round_trip_without_lr(tmp_path):
    synset = make_set()
    assert synset.save(tmp_path / "set") == tmp_path / "set"
    loaded = SyntheticSet.load(tmp_path / "set")
    assert torch.equal(loaded.images, synset.images)
    assert torch.equal(loaded.labels, synset.labels)
    assert loaded.images.dtype == torch.float32 and loaded.labels.dtype == torch.int64
    assert loaded.lr is None
    assert loaded.manifest == synset.manifest
    on_disk = json.loads((tmp_path / "set" / MANIFEST_FILE).read_text())
    assert len(on_disk["sha256"]) == 64
    assert on_disk["tensors"] == {
        "images": {"shape": [6, 3, 8, 8], "dtype": "float32"},
        "labels": {"shape": [6], "dtype": "int64"},
    }
    # Only the three files remain: no temporaries left behind.
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(
        [TENSORS_FILE, MANIFEST_FILE, GRID_FILE]
    )


def test_round_trip_with_lr(tmp_path):
    learned = torch.tensor(0.0123, requires_grad=True)
    synset = make_set(lr=learned)
    assert not synset.lr.requires_grad and synset.lr.shape == ()
    loaded = SyntheticSet.load(synset.save(tmp_path))
    assert loaded.lr is not None and loaded.lr.dtype == torch.float32
    assert torch.equal(loaded.lr, synset.lr)


def test_save_overwrites_previous_set(tmp_path):
    make_set(lr=0.5).save(tmp_path)
    make_set(ipc=1).save(tmp_path)
    loaded = SyntheticSet.load(tmp_path)
    assert loaded.lr is None and loaded.ipc == 1 and len(loaded.images) == 3


def test_tampered_tensors_rejected_by_checksum(tmp_path):
    make_set().save(tmp_path)
    path = tmp_path / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one pixel
    path.write_bytes(bytes(data))
    with pytest.raises(SyntheticSetError, match="checksum") as info:
        SyntheticSet.load(tmp_path)
    assert TENSORS_FILE in str(info.value)


def test_edited_manifest_shape_rejected(tmp_path):
    make_set().save(tmp_path)

    def edit(m):
        m["tensors"]["images"]["shape"] = [6, 3, 8, 9]

    edit_manifest(tmp_path, edit)
    with pytest.raises(SyntheticSetError, match="images") as info:
        SyntheticSet.load(tmp_path)
    assert TENSORS_FILE in str(info.value)


def test_edited_manifest_image_shape_rejected(tmp_path):
    make_set().save(tmp_path)
    edit_manifest(tmp_path, lambda m: m.update(image_shape=[3, 16, 16]))
    with pytest.raises(SyntheticSetError, match="manifest says"):
        SyntheticSet.load(tmp_path)


def test_labels_out_of_range_rejected(tmp_path):
    make_set().save(tmp_path)

    def drop_class(m):
        m["num_classes"] = 2
        m["class_names"] = m["class_names"][:2]

    edit_manifest(tmp_path, drop_class)
    with pytest.raises(SyntheticSetError, match="labels must lie"):
        SyntheticSet.load(tmp_path)


def test_wrong_format_version_rejected(tmp_path):
    make_set().save(tmp_path)
    edit_manifest(tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(SyntheticSetError, match="format_version") as info:
        SyntheticSet.load(tmp_path)
    assert MANIFEST_FILE in str(info.value)


@pytest.mark.parametrize("name", [TENSORS_FILE, MANIFEST_FILE])
def test_missing_file_named(tmp_path, name):
    make_set().save(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(SyntheticSetError, match="not found") as info:
        SyntheticSet.load(tmp_path)
    assert name in str(info.value)


def test_garbage_manifest_rejected(tmp_path):
    make_set().save(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(SyntheticSetError, match=MANIFEST_FILE):
        SyntheticSet.load(tmp_path)


@pytest.mark.parametrize("channels,size,ipc", [(3, 8, 2), (1, 28, 3), (3, 32, 1)])
def test_grid_png_size(tmp_path, channels, size, ipc):
    make_set(ipc=ipc, channels=channels, size=size).save(tmp_path)
    with Image.open(tmp_path / GRID_FILE) as image:
        assert image.format == "PNG"
        assert image.size == grid_size(CLASSES, ipc, size, size)
    # Small images are upscaled: 8x8 cells become 56x56, 28x28 ones 56x56; a class-name column
    # comes first.
    label = grid_size(CLASSES, ipc, size, size)[0] - grid_size([""], ipc, size, size)[0]
    assert label > 0
    cell = {8: 56, 28: 56, 32: 32}[size]
    assert grid_size(CLASSES, ipc, size, size) == (
        grid_size([""], ipc, size, size)[0] + label, len(CLASSES) * (cell + 2) + 2)
    assert grid_size([""], ipc, size, size)[0] == 2 * GRID_LABEL_GAP + ipc * (cell + 2) + 2


def test_grid_rows_are_classes(tmp_path):
    # Shuffled labels; each class a flat colour, so rows of the grid must be uniform.
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    pixel = labels.float().div(2).view(-1, 1, 1, 1).expand(6, 1, 8, 8)
    synset = SyntheticSet.create(
        pixel.clone(), labels, dataset="Toy", class_names=CLASSES, mean=(0.0,), std=(1.0,),
        config={}, eval_protocol={},
    )
    synset.save(tmp_path)
    label = grid_size(CLASSES, 2, 8, 8)[0] - grid_size([""], 2, 8, 8)[0] + 2 * GRID_LABEL_GAP
    with Image.open(tmp_path / GRID_FILE) as image:
        grey = image.convert("L")
        for row in range(3):
            y = 2 + row * 58 + 28  # centre of a cell in that row (8 px upscaled to 56)
            values = {grey.getpixel((label + 2 + col * 58 + 28, y)) for col in range(2)}
            assert values == {round(255 * row / 2)}
            # the class name, light on the dark label column
            assert max(grey.getpixel((x, y)) for x in range(label)) > 150


def test_denormalised_inverts_normalisation():
    synset = make_set()
    assert torch.allclose(synset.denormalised(), synset.images * 0.25 + 0.5)


def test_to_dataset_with_dataloader():
    synset = make_set()
    loader = DataLoader(synset.to_dataset(), batch_size=4, shuffle=True)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, 8, 8) and labels.dtype == torch.int64
        seen += len(labels)
    assert seen == 6


def test_load_never_unpickles(tmp_path, monkeypatch):
    make_set(lr=0.01).save(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = SyntheticSet.load(tmp_path)
    assert loaded.lr is not None and len(loaded.images) == 6


def test_load_refuses_endless_files_and_non_finite_images(tmp_path):
    import hashlib

    import safetensors.torch

    folder = make_set().save(tmp_path / "set")
    endless = tmp_path / "endless"
    endless.mkdir()
    (endless / MANIFEST_FILE).symlink_to("/dev/zero")  # read_bytes would never return
    with pytest.raises(SyntheticSetError, match="not a regular file"):
        SyntheticSet.load(endless)

    # A set whose images were swapped for NaN, with a checksum that matches the swap.
    tensors = safetensors.torch.load((folder / TENSORS_FILE).read_bytes())
    tensors["images"][0, 0, 0, 0] = float("nan")
    data = safetensors.torch.save(tensors)
    (folder / TENSORS_FILE).write_bytes(data)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SyntheticSetError, match="NaN or infinite"):
        SyntheticSet.load(folder)


def test_written_files_honour_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        folder = make_set().save(tmp_path / "set")
    finally:
        os.umask(old)
    for name in (TENSORS_FILE, MANIFEST_FILE):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name
