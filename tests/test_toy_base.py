"""A base registered from outside mim4dd runs through the engine and through a one-trial sweep:
the proof that a base is one class, one file and one registry line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from conftest import tiny_config, use_plugin
from mim4dd import bases
from mim4dd.config import Config
from mim4dd.experiment import run_experiment

TOY = Path(__file__).parent / "plugins" / "toy_base.py"


@pytest.fixture
def toy_plugin(monkeypatch):
    """$MIM4DD_PLUGINS names the toy base; the registry is restored afterwards."""
    use_plugin(monkeypatch, TOY)


def test_unknown_base_names_the_registered_ones(toy_plugin):
    with pytest.raises(ValidationError, match="'kip' is not allowed .*'cafe' or 'toy'"):
        Config(base="kip")
    assert bases.base_names() == ["dm", "dc", "mtt", "cafe", "toy"]


def test_toy_base_runs_through_the_engine(toy_plugin, digits):
    with pytest.raises(ValidationError, match="base toy takes ipc up to 50, got 60"):
        tiny_config(base="toy", ipc=60)  # the class's own config check
    config = tiny_config(base="toy", lam=0.8, lr_img=0.5, iterations=6)
    seen = []

    class Listener:
        def on_start(self, distiller):
            assert type(distiller.objective).__name__ == "ToyMatching"

        def on_iteration(self, iteration, metrics):
            seen.append(metrics)

        def on_checkpoint(self, iteration, state):
            pass

    result = run_experiment(config, digits, callback=Listener())
    assert len(seen) == config.iterations and all("loss_mim" in m for m in seen)
    assert seen[-1]["loss_base"] < seen[0]["loss_base"]  # the images move toward the means
    assert result.synset.images.shape[0] == 10 * config.ipc
    assert len(result.evaluation.test_accuracies) == config.eval.num_nets


@pytest.mark.slow
def test_toy_base_runs_as_a_one_trial_sweep(toy_plugin, ray_cluster, home, tmp_path):
    from orchestrator import service
    from orchestrator.spec import load_spec

    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy", "engine": {"base": "toy", "dataset": "digits", "ipc": 1, "iterations": 3,
                                  "batch_real": 16, "model": {"width": 8},
                                  "eval": {"epochs": 5, "num_nets": 1}},
        "grid": {"lam": [0.8]}, "retries": 0,
    }))
    outcome = service.launch(load_spec(path), progress=False)
    assert outcome.status == "FINISHED" and outcome.finished == ["lam=0.8"], outcome.failed
    assert outcome.summary is not None and int(outcome.summary["n_nets"].iloc[0]) == 1
