"""Expert buffers: trained once per key, verified on open and on read, never silently used."""

import json

import pytest
import torch
from conftest import tiny_config

from mim4dd.distill import Distiller
from mim4dd.experts import (
    MANIFEST_FILE,
    ExpertBuffer,
    ExpertBufferError,
    expert_dir,
    expert_key,
    expert_seed,
    train_experts,
)
from mim4dd.flat import FlatParams
from mim4dd.models import build_model

SETTINGS = dict(base="mtt", num_experts=2, expert_train_epochs=2, max_start_epoch=1,
                expert_epochs=1, syn_steps=2)


def config_for(folder, **overrides):
    return tiny_config(expert_dir=str(folder), **{**SETTINGS, **overrides})


@pytest.fixture
def buffer_dir(digits, tmp_path):
    folder = tmp_path / "experts"
    train_experts(config_for(folder), data=digits)
    return folder


def test_buffer_holds_one_verified_trajectory_per_expert(digits, buffer_dir):
    config = config_for(buffer_dir)
    buffer = ExpertBuffer.open(buffer_dir, expert_key(config, digits), min_count=2)
    info = digits.info
    net = build_model(info.channels, info.image_size, info.num_classes, config.model,
                      seed=expert_seed(1))
    trajectory = buffer.trajectory(1)
    assert trajectory.shape == (3, FlatParams(net).size) and trajectory.dtype == torch.float32
    assert torch.equal(trajectory[0], FlatParams(net).flatten(net))  # the seeded initial weights
    assert not torch.equal(trajectory[1], trajectory[0])
    assert torch.equal(buffer.rows(1, [2, 0]), trajectory[[2, 0]])
    manifest = json.loads((buffer_dir / MANIFEST_FILE).read_text())
    assert manifest["count"] == 2 and len(manifest["files"]) == 2


def test_buffer_is_reused_not_retrained(digits, buffer_dir):
    stamps = {p.name: p.stat().st_mtime_ns for p in buffer_dir.glob("expert_*")}
    reports = []
    train_experts(config_for(buffer_dir), data=digits,
                  callback=lambda i, epoch, loss: reports.append((i, loss)))
    assert {p.name: p.stat().st_mtime_ns for p in buffer_dir.glob("expert_*")} == stamps
    assert reports == [(0, None), (1, None)]  # reported, never trained again

def test_default_folder_is_keyed_by_what_experts_depend_on(digits):
    def folder(**overrides):
        return expert_dir(tiny_config(**{**SETTINGS, **overrides}), digits)

    # lambda, ipc and the distillation's own knobs are not part of the key...
    assert folder(lam=0.1, ipc=3, syn_steps=9, num_experts=7) == folder()
    # ...while the model, the augmentation and the expert training are
    assert folder(model={"width": 16}) != folder()
    assert folder(dsa_strategy="none") != folder() != folder(expert_lr=0.02)
    assert folder().parent.name == "experts" and folder().name.startswith("digits-")


def test_missing_buffer_names_the_command(digits, tmp_path):
    with pytest.raises(ExpertBufferError, match="mim4dd experts"):
        Distiller(config_for(tmp_path / "nothing"), digits)


def test_partial_buffer_is_refused(digits, buffer_dir):
    (buffer_dir / MANIFEST_FILE).unlink()  # as if training stopped before sealing
    with pytest.raises(ExpertBufferError, match="2 expert file.*interrupted"):
        Distiller(config_for(buffer_dir), digits)


def test_truncated_file_is_refused(digits, buffer_dir):
    path = buffer_dir / "expert_1.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExpertBufferError, match="missing or truncated"):
        Distiller(config_for(buffer_dir), digits)


def test_corrupted_file_is_refused_before_use(digits, buffer_dir):
    path = buffer_dir / "expert_0.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one weight changed
    path.write_bytes(bytes(data))
    distiller = Distiller(config_for(buffer_dir), digits)
    buffer = distiller.objective.buffer
    with pytest.raises(ExpertBufferError, match="sha256"):
        buffer.trajectory(0)


def test_buffer_of_other_settings_or_too_few_experts_is_refused(digits, buffer_dir):
    with pytest.raises(ExpertBufferError, match="other settings.*model"):
        Distiller(config_for(buffer_dir, model={"width": 16}), digits)
    with pytest.raises(ExpertBufferError, match="holds 2 experts.*asks for 3"):
        Distiller(config_for(buffer_dir, num_experts=3), digits)
