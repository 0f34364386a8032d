"""ZCA whitening: kornia's numerics, fitted on the train split only, carried by the synthetic set."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import scipy.linalg
import torch
from conftest import tiny_config
from PIL import Image

from mim4dd import zca as zca_module
from mim4dd.data import Split, load_dataset, load_once, whitened
from mim4dd.distill import Distiller
from mim4dd.experiment import evaluate_synset
from mim4dd.experts import ExpertBufferError, expert_key, train_experts
from mim4dd.synset import GRID_FILE, MANIFEST_FILE, TENSORS_FILE, SyntheticSet, SyntheticSetError
from mim4dd.zca import DEFAULT_EPS, ZCA

EPS = DEFAULT_EPS


@pytest.fixture(scope="module")
def white():
    """The digits of the `digits` fixture (same split), whitened."""
    return load_dataset("digits", val_fraction=0.1, seed=0, zca=True)


def pixels(data, split: str) -> torch.Tensor:
    return data.denormalise(getattr(data, split).images)


def kornia_reference(x: np.ndarray, eps: float):
    """kornia's ZCAWhitening(eps, unbiased=True) written independently in numpy/scipy: covariance
    over N - 1, SVD of it, W = U diag(1 / sqrt(S + eps)) U^T and W^-1 = U diag(sqrt(S + eps)) U^T."""
    mean = x.mean(0)
    u, s, _ = scipy.linalg.svd(np.cov(x, rowvar=False))
    w = u @ np.diag(1 / np.sqrt(s + eps)) @ u.T
    w_inv = u @ np.diag(np.sqrt(s + eps)) @ u.T
    return mean, w, w_inv


@pytest.mark.parametrize("chunk", [4096, 97])  # one covariance/apply chunk, and many
def test_fit_matches_kornias_formula(digits, monkeypatch, chunk):
    monkeypatch.setattr(zca_module, "FIT_CHUNK", chunk)
    monkeypatch.setattr(zca_module, "APPLY_CHUNK", chunk)
    x = pixels(digits, "train")
    transform = ZCA.fit(x, EPS)
    flat = x.reshape(len(x), -1).double().numpy()
    mean, w, w_inv = kornia_reference(flat, EPS)
    expected = (flat - mean) @ w
    found = transform.whiten(x).reshape(len(x), -1).double().numpy()
    assert np.abs(found - expected).max() < 2e-5  # float32 storage; |z| is up to ~5
    test = pixels(digits, "test").reshape(len(digits.test), -1).double().numpy()
    assert np.allclose(transform.whiten(torch.tensor(test).float()).numpy(),
                       (test - mean) @ w, atol=2e-5)
    z = torch.tensor(expected).float().reshape(x.shape)
    assert np.allclose(transform.unwhiten(z).reshape(len(x), -1).numpy(),
                       expected @ w_inv + mean, atol=2e-5)


def test_whitened_training_covariance_is_identity_up_to_eps(digits, white):
    """Cov(z) = W Sigma W = Sigma (Sigma + eps I)^-1 = I - eps (Sigma + eps I)^-1 exactly: the
    identity along directions of variance >> eps, 0 along constant pixels (digits' corners)."""
    z = white.train.images.reshape(len(white.train), -1).double().numpy()
    sigma = np.cov(pixels(digits, "train").reshape(len(z), -1).double().numpy(), rowvar=False)
    expected = np.eye(len(sigma)) - EPS * np.linalg.inv(sigma + EPS * np.eye(len(sigma)))
    assert np.abs(np.cov(z, rowvar=False) - expected).max() < 1e-5
    assert np.abs(z.mean(0)).max() < 1e-5
    # Per direction: variance S becomes S / (S + eps), in [0, 1). Digits' pixel variances are
    # small (largest S ~ 0.7), so eps = 0.1 whitens them only partly.
    variances = np.linalg.eigvalsh(sigma).clip(0)
    assert np.allclose(np.linalg.eigvalsh(np.cov(z, rowvar=False)), variances / (variances + EPS),
                       atol=1e-5)


def test_unwhiten_inverts_whiten(digits, white):
    for split in ("train", "val", "test"):
        assert torch.allclose(pixels(white, split), pixels(digits, split), atol=1e-5)
    x = pixels(digits, "test")
    assert torch.allclose(white.zca.unwhiten(white.zca.whiten(x)), x, atol=1e-5)


def test_fit_ignores_validation_and_test(digits, white):
    noise = torch.Generator().manual_seed(1)

    def scrambled(split: Split) -> Split:
        return Split(torch.randn(split.images.shape, generator=noise) * 3, split.labels)

    other = whitened(replace(digits, val=scrambled(digits.val), test=scrambled(digits.test)))
    for name, tensor in white.zca.tensors().items():
        assert torch.equal(other.zca.tensors()[name], tensor), name
    assert torch.equal(other.train.images, white.train.images)
    assert not torch.equal(other.test.images, white.test.images)
    # A given transform (a saved set's) is used as it is, not refitted.
    assert torch.equal(whitened(digits, white.zca).test.images, white.test.images)


def test_data_layer_keys_and_refuses_by_space(digits, white):
    plain, zca = tiny_config(), tiny_config(zca=True)
    loaded: dict = {}
    assert load_once(plain, loaded).zca is None and load_once(zca, loaded).zca is not None
    assert len(loaded) == 2
    with pytest.raises(ValueError, match="whitened already"):
        whitened(white)
    # Expert keys record the space experts really train in; mismatched data is refused.
    assert expert_key(zca, white)["zca"] == {"eps": EPS, "input": "pixels"}
    assert expert_key(plain, digits)["zca"] is False
    with pytest.raises(ExpertBufferError, match="not whitened"):
        expert_key(zca, digits)
    with pytest.raises(ExpertBufferError, match="config.zca is False"):
        expert_key(plain, white)


def zca_set(data, config, ipc: int = 2) -> SyntheticSet:
    """A set initialised, as distillation does, from real whitened images of each class."""
    images, labels = data.sample_per_class(ipc, torch.Generator().manual_seed(0))
    info = data.info
    return SyntheticSet.create(
        images, labels, dataset=info.name, class_names=data.class_names, mean=info.mean,
        std=info.std, config=config.model_dump(mode="json"),
        eval_protocol=config.eval.model_dump(mode="json"), zca=data.zca,
    )


def test_saved_zca_set_evaluates_identically(tmp_path, digits, white):
    config = tiny_config(zca=True, eval={"epochs": 2, "num_nets": 1, "batch_size": 64})
    synset = zca_set(white, config)
    first = evaluate_synset(synset, config, white)
    loaded = SyntheticSet.load(synset.save(tmp_path / "set"))
    # As a pulled set is used: its own config, its data loaded (and whitened) afresh.
    again = evaluate_synset(loaded, type(config).model_validate(loaded.manifest["config"]))
    assert again.test_accuracies == first.test_accuracies
    assert again.val_accuracies == first.val_accuracies
    assert loaded.manifest["zca"]["eps"] == EPS and loaded.manifest == synset.manifest
    # It whitens new real images exactly as the data layer did, and un-whitens its own.
    assert torch.equal(loaded.normalise(pixels(digits, "test")), white.test.images)
    assert torch.allclose(loaded.denormalised(), white.denormalise(synset.images), atol=1e-6)
    assert torch.equal(loaded.to_dataset().tensors[0], synset.images)


def test_a_zca_config_needs_its_transform(white):
    config = tiny_config(zca=True)
    with pytest.raises(SyntheticSetError, match="no ZCA transform"):
        zca_set(replace(white, zca=None), config)
    with pytest.raises(SyntheticSetError, match="a ZCA transform"):
        zca_set(white, tiny_config())


def _tensor_bytes(path, name: str) -> tuple[int, int]:
    """Where tensor `name`'s data lies in a safetensors file (8-byte header size, JSON header)."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + header_size])[name]["data_offsets"]
    return 8 + header_size + start, 8 + header_size + end


@pytest.mark.parametrize("name", ["zca_basis", "zca_scale", "zca_mean"])
def test_tampered_transform_is_refused_like_tampered_images(tmp_path, white, name):
    folder = zca_set(white, tiny_config(zca=True)).save(tmp_path)
    path = folder / TENSORS_FILE
    start, end = _tensor_bytes(path, name)
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x01  # one bit of one value
    path.write_bytes(bytes(data))
    with pytest.raises(SyntheticSetError, match="sha256 checksum mismatch") as info:
        SyntheticSet.load(folder)
    assert TENSORS_FILE in str(info.value)


def test_a_set_stripped_of_its_transform_is_refused(tmp_path, white):
    import hashlib

    folder = zca_set(white, tiny_config(zca=True)).save(tmp_path)
    tensors = safetensors.torch.load((folder / TENSORS_FILE).read_bytes())
    kept = {k: v for k, v in tensors.items() if not k.startswith("zca_")}
    data = safetensors.torch.save(kept)
    (folder / TENSORS_FILE).write_bytes(data)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256(data).hexdigest()  # a consistent, deliberate edit
    manifest["tensors"] = {k: v for k, v in manifest["tensors"].items() if k in kept}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SyntheticSetError, match="a ZCA set needs all of"):
        SyntheticSet.load(folder)


def test_grid_shows_unwhitened_pictures(tmp_path, white):
    whitened_set = zca_set(white, tiny_config(zca=True))
    pictures = white.denormalise(whitened_set.images)
    as_pixels = SyntheticSet.create(  # the same pictures, stored as plain pixels
        pictures, whitened_set.labels, dataset="digits", class_names=white.class_names,
        mean=(0.0,), std=(1.0,), config={}, eval_protocol={},
    )
    whitened_set.save(tmp_path / "zca")
    as_pixels.save(tmp_path / "pixels")
    grids = [np.asarray(Image.open(tmp_path / name / GRID_FILE), dtype=int)
             for name in ("zca", "pixels")]
    assert np.abs(grids[0] - grids[1]).max() <= 1  # float round-off may move one grey level
    assert grids[0].std() > 20  # pictures, not a flat field


def test_mtt_runs_in_zca_space_with_zca_experts(tmp_path, white):
    config = tiny_config(zca=True, base="mtt", num_experts=1, expert_train_epochs=2,
                         max_start_epoch=1, expert_epochs=1, syn_steps=2,
                         expert_dir=str(tmp_path / "experts"))
    buffer = train_experts(config, data=white)
    assert buffer.manifest["key"]["zca"] == {"eps": EPS, "input": "pixels"}
    distiller = Distiller(config, white)
    assert torch.equal(distiller.train_images, white.train.images)  # the whitened split
    metrics = distiller.step()
    assert np.isfinite(metrics["loss"])
