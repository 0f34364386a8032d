"""Presets: per base and dataset x IPC values from the packaged YAML, under the user's."""

import pytest
from pydantic import ValidationError

from mim4dd.config import Config
from mim4dd.presets import preset_names, preset_values


@pytest.mark.parametrize("base", ["dm", "dc", "mtt"])
def test_every_preset_is_a_valid_config(base):
    assert preset_names(base)
    for name in preset_names(base):
        config = Config(base=base, preset=name)  # as published: zca presets included
        dataset, ipc = name.split("-ipc")
        assert config.dataset.lower() == dataset and config.ipc == int(ipc)
        assert config.zca == preset_values(base, name).get("zca", False)


def test_preset_fills_only_unset_fields():
    config = Config(base="mtt", preset="cifar100-ipc50", lr_img=5.0)
    assert config.lr_img == 5.0  # set by the user
    assert (config.syn_steps, config.max_start_epoch, config.batch_syn) == (80, 40, 125)
    assert config.lr_milestones == [] and config.lr_teacher == 0.01
    # a dumped config re-validates to itself (state files and manifests hold dumps)
    assert Config.model_validate(config.model_dump(mode="json")) == config


def test_published_mtt_values():
    assert preset_values("mtt", "cifar10-ipc10") == {
        "dataset": "CIFAR10", "ipc": 10, "syn_steps": 30, "expert_epochs": 2,
        "max_start_epoch": 20, "lr_img": 100, "lr_lr": 1e-5, "lr_teacher": 0.001, "zca": True,
        "iterations": 5000, "lr_milestones": [], "expert_train_epochs": 50, "expert_lr": 0.01,
    }


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValidationError, match="unknown preset 'mnist-ipc10'.*allowed: cifar10"):
        Config(base="mtt", preset="mnist-ipc10")


def test_zca_presets_whiten_as_published():
    assert Config(base="mtt", preset="cifar10-ipc1").zca
    assert not Config(base="mtt", preset="cifar10-ipc50").zca
    assert not Config(base="mtt", preset="cifar10-ipc1", zca=False).zca  # the user's word wins


def test_mtt_targets_must_lie_inside_the_trajectory():
    with pytest.raises(ValidationError, match="exceeds expert_train_epochs"):
        Config(base="mtt", max_start_epoch=50, expert_epochs=2, expert_train_epochs=50)
