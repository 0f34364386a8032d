"""One experiment: load the data, distill (resuming from a saved state), evaluate, save.

`run_experiment` is the one place this pipeline is written. `mim4dd distill` and the sweep
service's Tune trainable are thin callers: each passes an `ExperimentCallback` that receives
every step's metrics, the state at checkpoint steps, the start of the evaluation and each
evaluation network as it finishes, and does its own thing with them (a progress bar and a
state file; Tune reports and MLflow). A notebook calls it with no callback at all.

`evaluate_random_baseline` is the number a distilled set is read against: the same evaluation
of as many random real training images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mim4dd.atomic import write_atomic
from mim4dd.config import Config, EvalConfig
from mim4dd.data import RealData, load_for, whitened
from mim4dd.device import resolve_device
from mim4dd.distill import INIT_STREAM, DistillCallback, Distiller, read_state, step_seed
from mim4dd.evaluate import EvalResult, Evaluator, NetEpoch, NetResult
from mim4dd.synset import SyntheticSet

RESULTS_FILE = "results.json"  # beside a saved set: its config, progress and evaluation
STATE_FILE = "state.pt"  # a resumable distillation state (`Distiller.state_dict`)


class ExperimentCallback(DistillCallback):
    """Distillation progress (see `DistillCallback`) plus the experiment's later stages."""

    def on_evaluation_start(self, config: EvalConfig) -> None: ...

    def on_network(self, network: NetResult) -> None:
        """An evaluation network finished; saved, it spares a resumed run from retraining it
        (`run_experiment(evaluated=...)`)."""

    def on_eval_epoch(self, epoch: NetEpoch) -> None:
        """An evaluation network finished an epoch (progress only)."""


@dataclass
class ExperimentResult:
    synset: SyntheticSet
    evaluation: EvalResult | None

    def results_dict(self, **extra: Any) -> dict:
        """What `RESULTS_FILE` holds; `extra` (e.g. the sweep and trial key) goes first."""
        return {
            **extra,
            "config": self.synset.manifest["config"],
            "iterations_done": self.synset.manifest.get("iterations_done"),
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
        }

    def write_results(self, path: str | Path, **extra: Any) -> Path:
        path = Path(path)
        text = json.dumps(self.results_dict(**extra), indent=2) + "\n"
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path

    def save(self, directory: str | Path, **extra: Any) -> Path:
        """The set (safetensors + manifest + PNG grid) and `RESULTS_FILE` side by side."""
        directory = self.synset.save(directory)
        self.write_results(directory / RESULTS_FILE, **extra)
        return directory


def finished_config(directory: str | Path) -> Config | None:
    """The config of the finished run `directory` holds (its results file); None when none."""
    try:
        done = json.loads((Path(directory) / RESULTS_FILE).read_text(encoding="utf-8"))
        # Validated again, so that a field added since (given its default) is not a change.
        return Config.from_saved(done["config"])
    except (OSError, ValueError, TypeError, KeyError):  # ValueError: also a ValidationError
        return None


def finished_in(directory: str | Path, config: Config) -> bool:
    """True when `directory` holds the results of a run of exactly this config."""
    saved = finished_config(directory)
    return saved is not None and saved.digest() == config.digest()


def load_data(config: Config) -> RealData:
    return load_for(config)


def evaluator_for(config: Config, data: RealData) -> Evaluator:
    return Evaluator(config.eval, config.model, data, config.dsa_strategy,
                     resolve_device(config.device), compile=config.compile, run_seed=config.seed)


def evaluate_synset(
    synset: SyntheticSet, config: Config, data: RealData | None = None,
    done: Iterable[NetResult] = (), on_network: Callable[[NetResult], None] | None = None,
    on_epoch: Callable[[NetEpoch], None] | None = None,
) -> EvalResult:
    """Evaluate a set under `config.eval`, using its learned lr when it carries one. A ZCA set
    is evaluated in exactly its own space: the real splits are whitened by its stored
    transform, not by a refit. `done`, `on_network`, `on_epoch`: see `Evaluator.evaluate`."""
    if data is None:
        data = load_data(config.model_copy(update={"zca": False}))
        data = whitened(data, synset.zca) if synset.zca is not None else data
    if (synset.zca is None) != (data.zca is None):
        raise ValueError("the set and the data are not in the same space: one is ZCA-whitened "
                         "and the other is not")
    return evaluator_for(config, data).evaluate(synset.images, synset.labels, synset.lr,
                                                done=done, on_network=on_network,
                                                on_epoch=on_epoch)


def random_real_subset(
    config: Config, data: RealData, seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`config.ipc` random training images per class: those a distillation with `seed`
    (default `config.seed`) starts from with `init: real`, so that the difference to its set
    is what distilling added. They depend only on the data, the IPC and the seed."""
    if problem := data.ipc_problem(config.ipc):
        raise ValueError(problem)
    seed = config.seed if seed is None else seed
    generator = torch.Generator().manual_seed(step_seed(seed, 0, stream=INIT_STREAM))
    return data.sample_per_class(config.ipc, generator)


def evaluate_random_baseline(config: Config, data: RealData | None = None) -> EvalResult:
    """`config.eval` (its architectures, networks and seeds; the configured lr) on
    `random_real_subset`: the number a distilled set of this size is read against."""
    data = data or load_data(config)
    return evaluator_for(config, data).evaluate(*random_real_subset(config, data))


def run_experiment(
    config: Config,
    data: RealData | None = None,
    callback: DistillCallback | None = None,
    evaluate: bool = True,
    state: dict | str | Path | None = None,
    checkpoint_every: int = 0,
    evaluated: Iterable[NetResult] = (),
) -> ExperimentResult:
    """Distill (continuing from `state`, a state dict or a `STATE_FILE`, if given), then
    evaluate on the real test split. `callback.on_checkpoint` gets the state every
    `checkpoint_every` iterations and at the final one before evaluating, and `on_network`
    each finished evaluation network; saving them is the caller's choice. `evaluated`:
    networks finished before a stop, not redone."""
    callback = callback or ExperimentCallback()
    data = data or load_data(config)
    # Built first: a pool network that cannot take these images fails before distilling.
    evaluator = evaluator_for(config, data) if evaluate else None
    distiller = Distiller(config, data)
    if state is not None:
        distiller.load_state_dict(state if isinstance(state, dict) else read_state(state))
    start = distiller.iteration
    synset = distiller.run(callback, checkpoint_every=checkpoint_every)
    evaluation = None
    if evaluator is not None:
        done = distiller.iteration
        if checkpoint_every and (done == start or done % checkpoint_every):
            # The final state, before evaluating: a caller that saves it with the finished
            # networks (`on_network`) resumes a stopped evaluation without distilling again.
            callback.on_checkpoint(done, distiller.state_dict())
        on_network = on_epoch = None
        if isinstance(callback, ExperimentCallback):
            callback.on_evaluation_start(config.eval)
            on_network, on_epoch = callback.on_network, callback.on_eval_epoch
        evaluation = evaluator.evaluate(synset.images, synset.labels, synset.lr,
                                        done=evaluated, on_network=on_network,
                                        on_epoch=on_epoch)
    return ExperimentResult(synset, evaluation)


__all__ = ["RESULTS_FILE", "STATE_FILE", "ExperimentCallback", "ExperimentResult",
           "evaluate_random_baseline", "evaluate_synset", "evaluator_for", "finished_config",
           "finished_in", "load_data", "random_real_subset", "run_experiment"]
