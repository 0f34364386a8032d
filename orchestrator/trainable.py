"""One sweep trial as a Ray Tune function trainable: distill, evaluate, log, with checkpoints.

Tune calls `train_trial(config, context)`:

* `config` is the trial (Tune's param space entry): ``{"trial": {"key", "overrides",
  "config" (the engine Config as JSON), "digest"}}``;
* `context` is the launch (bound with `tune.with_parameters`, so a relaunch passes fresh
  values): sweep name, tracking URI, parent run id, checkpoint_every, cpus per trial.

Every MLflow call happens here, in the trial's process, so a trial on a remote Ray worker logs
straight to the tracking server. Each checkpoint is a folder with the engine state
(`torch.save`, read back with `weights_only=True`) and the id of the trial's MLflow run, so a
retried or resumed trial continues both the optimisation and the same child run.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from mim4dd.config import Config
from mim4dd.distill import DistillCallback, Distiller
from mim4dd.experiment import ExperimentResult, evaluate_synset, load_data
from orchestrator import tracking

STATE_FILE = "distill_state.pt"
TRIAL_FILE = "trial.json"  # {"run_id", "key", "iteration"} beside the state


def payload(trial: Any) -> dict[str, Any]:
    """The JSON-able Tune config of a spec `Trial`."""
    return {
        "key": trial.key,
        "overrides": dict(trial.overrides),
        "config": trial.config.model_dump(mode="json"),
        "digest": trial.config_digest,
    }


class _Reporter(DistillCallback):
    """Engine progress -> `tune.report` every iteration, MLflow in batches, Tune checkpoints."""

    def __init__(self, run: tracking.TrialRun, key: str, checkpoint_every: int):
        self.run = run
        self.key = key
        self.checkpoint_every = checkpoint_every
        self.last: dict[str, float] = {}

    def on_iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        self.last = {"iteration": iteration, **metrics}
        self.run.log_iteration(iteration, metrics)
        if not (self.checkpoint_every and iteration % self.checkpoint_every == 0):
            tune.report(self.last)  # checkpoint iterations report from on_checkpoint

    def on_checkpoint(self, iteration: int, state: dict) -> None:
        self.run.flush()  # MLflow holds every step up to the checkpoint before Tune does
        with tempfile.TemporaryDirectory(prefix="mim4dd-ckpt-") as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            info = {"run_id": self.run.run_id, "key": self.key, "iteration": iteration}
            (Path(folder) / TRIAL_FILE).write_text(json.dumps(info))
            tune.report(self.last, checkpoint=tune.Checkpoint.from_directory(folder))


def _restore_folder(workdir: Path) -> Path | None:
    """The trial's latest Tune checkpoint copied to `workdir`, or None when there is none."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        return Path(checkpoint.to_directory(str(workdir / "restore")))
    except Exception:  # e.g. pruned under a stale experiment state: start over, same run
        logging.getLogger(__name__).warning("cannot read the trial checkpoint", exc_info=True)
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no run id: the run is found by trial key instead


def _final_metrics(run: tracking.TrialRun) -> dict[str, float]:
    metrics = run.client.get_run(run.run_id).data.metrics
    return {k: v for k, v in metrics.items() if k == "iteration" or k.startswith("eval/")}


def _node_tags() -> dict[str, str]:
    import ray

    return {"mim4dd.node_id": ray.get_runtime_context().get_node_id(),
            "mim4dd.hostname": socket.gethostname()}


def train_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    trial = config["trial"]
    key = trial["key"]
    # A trial gets the cores Ray reserved for it, not every core of the node.
    torch.set_num_threads(max(1, int(context.get("cpus", 1))))
    engine_config = Config.model_validate(trial["config"])
    client = tracking.connect(context["tracking_uri"])

    with tempfile.TemporaryDirectory(prefix="mim4dd-trial-") as tmp:
        workdir = Path(tmp)
        restored = _restore_folder(workdir)
        saved = _read_json(restored / TRIAL_FILE) if restored else {}
        run = tracking.TrialRun.open(
            client, context["parent_run_id"], context["sweep"], key, trial["overrides"],
            trial["config"], trial["digest"], run_id=saved.get("run_id"),
        )
        if run.finished:  # finished before a kill; Tune's saved state just did not know yet
            tune.report({**_final_metrics(run), "skipped": 1})
            return
        try:
            final = _distill_and_log(run, engine_config, key, restored, workdir, context)
        except (KeyboardInterrupt, SystemExit) as exc:  # Tune stopping the trial (Ctrl-C)
            run.stop(f"interrupted ({type(exc).__name__}); relaunch the sweep to resume")
            raise
        except Exception as exc:
            run.fail(f"{type(exc).__name__}: {exc}")
            raise
        tune.report(final)


def _distill_and_log(
    run: tracking.TrialRun, config: Config, key: str, restored: Path | None, workdir: Path,
    context: dict[str, Any],
) -> dict[str, float]:
    run.set_tags(_node_tags())
    data = load_data(config)
    distiller = Distiller(config, data)
    if restored is not None:
        distiller.load_state(restored / STATE_FILE)
        run.set_tags({tracking.TAG_RESUMED: distiller.iteration})

    reporter = _Reporter(run, key, int(context.get("checkpoint_every", 0)))
    synset = distiller.run(reporter, checkpoint_every=reporter.checkpoint_every)
    evaluation = evaluate_synset(synset, config, data)
    metrics = run.log_evaluation(evaluation, step=distiller.iteration)

    synset_dir = synset.save(workdir / "out" / tracking.SYNSET_PATH)
    results = {
        "sweep": context["sweep"], "trial_key": key,
        **ExperimentResult(synset, evaluation).results_dict(),
    }
    results_file = workdir / "out" / tracking.RESULTS_FILE
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    run.log_outputs(synset_dir, results_file)
    run.finish()
    return {"iteration": distiller.iteration, **metrics}


__all__ = ["STATE_FILE", "TRIAL_FILE", "payload", "train_trial"]
