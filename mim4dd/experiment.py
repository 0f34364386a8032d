"""One experiment = one distillation followed by its N-network evaluation.

This is the unit a sweep trial runs and what `mim4dd distill` does; both call `run_experiment`
so a trial and a notebook compute the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mim4dd.config import Config
from mim4dd.data import RealData, load_for
from mim4dd.distill import DistillCallback, Distiller, resolve_device
from mim4dd.evaluate import EvalResult, Evaluator
from mim4dd.synset import SyntheticSet


@dataclass
class ExperimentResult:
    synset: SyntheticSet
    evaluation: EvalResult | None

    def results_dict(self) -> dict:
        return {
            "config": self.synset.manifest["config"],
            "iterations_done": self.synset.manifest.get("iterations_done"),
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
        }

    def save(self, directory: str | Path) -> Path:
        """The set (safetensors + manifest + PNG grid) and results.json side by side."""
        directory = Path(directory)
        self.synset.save(directory)
        (directory / "results.json").write_text(json.dumps(self.results_dict(), indent=2) + "\n")
        return directory


def load_data(config: Config) -> RealData:
    return load_for(config)


def evaluator_for(config: Config, data: RealData) -> Evaluator:
    return Evaluator(config.eval, config.model, data, config.dsa_strategy,
                     resolve_device(config.device))


def evaluate_synset(synset: SyntheticSet, config: Config, data: RealData | None = None) -> EvalResult:
    """Evaluate a set under `config.eval`, using its learned lr when it carries one."""
    data = data or load_data(config)
    return evaluator_for(config, data).evaluate(synset.images, synset.labels, synset.lr)


def run_experiment(
    config: Config,
    data: RealData | None = None,
    callback: DistillCallback | None = None,
    evaluate: bool = True,
    state: dict | None = None,
    checkpoint_every: int = 0,
) -> ExperimentResult:
    """Distill (resuming from `state` if given), then evaluate on the real test split."""
    data = data or load_data(config)
    distiller = Distiller(config, data)
    if state is not None:
        distiller.load_state_dict(state)
    synset = distiller.run(callback, checkpoint_every=checkpoint_every)
    evaluation = evaluate_synset(synset, config, data) if evaluate else None
    return ExperimentResult(synset, evaluation)
