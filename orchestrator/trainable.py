"""One sweep trial as a Ray Tune function trainable: the engine's experiment, logged, resumable.

Tune calls `train_trial(params, context, trials)`. Its param space holds only the trial key,
``params["trial"]``; what the trial is crosses typed, bound with `tune.with_parameters` (so a
relaunch passes fresh values through Ray's object store):

* `trials` maps each key to the spec's `Trial` (grid point, engine `Config`, digest);
* `context` is the `LaunchContext` of this launch.

The pipeline itself is the engine's `run_experiment`; this module only listens to it. Every
MLflow call happens here, in the trial's process, so a trial on a remote Ray worker logs
straight to the tracking server. Each Tune checkpoint is a folder with the engine state
(`STATE_FILE`, read back with `weights_only=True`) and the id of the trial's MLflow run, so a
retried or resumed trial continues both the optimisation and the same child run. During the
evaluation each finished network is logged, reported to Tune and checkpointed with the final
state (`NETWORKS_FILE`), so a stopped trial resumes its evaluation without retraining them.
A trial resumes from the newest readable checkpoint it has: Tune's own (a retry within this
launch), or one an earlier launch left (`LaunchContext.checkpoints_left`).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import socket
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import tune

from mim4dd.baseline import random_baseline, random_metrics
from mim4dd.bases import load_plugins
from mim4dd.config import EvalConfig
from mim4dd.datasets import DatasetError
from mim4dd.distill import Distiller, read_state, save_state
from mim4dd.evaluate import NetResult, network_metrics
from mim4dd.experiment import RESULTS_FILE, STATE_FILE, ExperimentCallback, run_experiment
from mim4dd.metrics import EVAL_PREFIX
from mim4dd.objectives.base import DivergenceError
from orchestrator.expand import Trial
from orchestrator.tracking import SYNSET_PATH, TAG_ITERATION, TAG_RESUMED, connect
from orchestrator.trial_run import TrialRun
from orchestrator.tune_folder import TRIAL_FILE

NETWORKS_FILE = "networks.json"  # the finished evaluation networks (`NetResult`s) beside it
# Errors a retry would only repeat: bad settings or data (ValueError and its kin: a missing
# dataset, a refused expert buffer or set), divergence, and running out of GPU memory (the
# retry asks for the same memory again). The trial ends FAILED at once.
DETERMINISTIC_ERRORS = (ValueError, DatasetError, DivergenceError, torch.OutOfMemoryError)
FAILED = "failed"  # in a trial's last Tune result: it ended FAILED without Tune retrying it


@dataclass(frozen=True)
class LaunchContext:
    """What every trial of one launch shares."""

    sweep: str
    tracking_uri: str
    parent_run_id: str
    checkpoint_every: int
    cpus: float  # the cores Ray reserves per trial
    plugins: tuple[str, ...] = ()  # $MIM4DD_PLUGINS of the driver: bases a worker must know
    # `lineage.source_tags` of the driver (sweep file, git commit), for every trial's run
    source_tags: dict[str, str] = field(default_factory=dict)
    # Per trial key, checkpoints of its current config an earlier launch left, newest first
    # (`tune_folder.resumable_checkpoints`)
    checkpoints_left: dict[str, list[str]] = field(default_factory=dict)
    # The sweep's `random_baseline`: also log the random-real baseline (mim4dd/baseline.py).
    # A default, so a context pickled by an older driver still reads.
    random_baseline: bool = False
    # Seconds between progress reports to Tune (0: every iteration); checkpoints always report.
    report_every_s: float = 0.0


class _Reporter(ExperimentCallback):
    """Engine progress -> `tune.report` every `report_every_s` seconds (a synchronous round
    trip to Tune's controller: every iteration held a 13 ms step to 0.63x, BENCHMARKS.md 7),
    MLflow in batches, Tune checkpoints; then each evaluation network -> MLflow, `tune.report`
    and a checkpoint. A stop request (Ctrl-C, `mim4dd-sweep stop`) takes effect at a report."""

    def __init__(
        self, run: TrialRun, trial: Trial, checkpoint_every: int, networks: list[NetResult],
        report_every_s: float,
    ):
        self.run = run
        self.trial = trial
        self.checkpoint_every = checkpoint_every
        self.report_every_s = report_every_s
        self.reported = -math.inf  # time.monotonic() of the last report
        self.last: dict[str, float] = {}
        self.networks = networks  # finished, restored ones first
        self.state: dict | None = None  # the last checkpointed one: the final state, evaluating
        self.models: list[str] = []
        self.total = 0

    def on_start(self, distiller: Distiller) -> None:
        self.last = {"iteration": distiller.iteration}
        self.run.log_inputs(distiller.data)  # again on a resume: MLflow keeps one of each
        if distiller.iteration:
            self.run.set_tags({TAG_RESUMED: distiller.iteration})

    def on_iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        self.last = {"iteration": iteration, **metrics}
        self.run.log_iteration(iteration, metrics)
        if self.checkpoint_every and iteration % self.checkpoint_every == 0:
            return  # checkpoint iterations report from on_checkpoint
        if time.monotonic() - self.reported >= self.report_every_s:
            self._report(with_checkpoint=False)

    def on_checkpoint(self, iteration: int, state: dict) -> None:
        self.state = state
        self._report(with_checkpoint=True)

    def on_evaluation_start(self, config: EvalConfig) -> None:
        self.models, self.total = config.models, len(config.models) * config.num_nets

    def on_network(self, network: NetResult) -> None:
        self.networks.append(network)
        self.run.log_once(network_metrics(network, self.models))  # sent before Tune's checkpoint
        self.last = {"iteration": self.last["iteration"], "eval_networks": self.total,
                     "eval_networks_done": len(self.networks),
                     "eval_architecture": network.architecture}
        self._report(with_checkpoint=self.state is not None)

    def _report(self, with_checkpoint: bool) -> None:
        self.reported = time.monotonic()
        if not with_checkpoint:
            tune.report(self.last)
            return
        assert self.state is not None
        self.run.flush()  # MLflow holds every step up to the checkpoint before Tune does
        with tempfile.TemporaryDirectory(prefix="mim4dd-ckpt-") as folder:
            save_state(self.state, Path(folder) / STATE_FILE)
            info = {"run_id": self.run.run_id, "key": self.trial.key,
                    "digest": self.trial.digest, "iteration": self.state["iteration"],
                    "networks": len(self.networks)}
            (Path(folder) / TRIAL_FILE).write_text(json.dumps(info))
            networks = [asdict(net) for net in self.networks]
            (Path(folder) / NETWORKS_FILE).write_text(json.dumps(networks))
            tune.report(self.last, checkpoint=tune.Checkpoint.from_directory(folder))


def _tune_checkpoint(workdir: Path) -> Path | None:
    """The trial's latest Tune checkpoint copied to `workdir`, or None when there is none."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        return Path(checkpoint.to_directory(str(workdir / "restore")))
    except Exception:  # e.g. pruned under a stale experiment state: another one, or afresh
        logging.getLogger(__name__).warning("cannot read the trial checkpoint", exc_info=True)
        return None


def _resume_from(workdir: Path, left: list[str]) -> tuple[Path, dict] | None:
    """The newest checkpoint whose state reads, with that state: Tune's or one of `left`
    (newest first), Tune's on a tie; None to start afresh."""
    tune_own = _tune_checkpoint(workdir)
    candidates = ([tune_own] if tune_own else []) + [Path(p) for p in left]

    def rank(folder: Path) -> tuple[int, int]:
        info = _read_json(folder / TRIAL_FILE)
        return int(info.get("iteration", 0)), int(info.get("networks", 0))

    for folder in sorted(candidates, key=rank, reverse=True):  # stable: Tune's first on a tie
        try:
            return folder, read_state(folder / STATE_FILE)
        except Exception:  # cut short by a kill, or pruned since: the next one
            continue
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no run id: the run is found by trial key instead


def _read_networks(path: Path) -> list[NetResult]:
    """The finished networks of a checkpoint; none when it has no (readable) list of them."""
    try:
        return [NetResult(**net) for net in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):  # TypeError: not a list of NetResult fields
        return []


def _final_metrics(run: TrialRun) -> dict[str, float]:
    data = run.client.get_run(run.run_id).data
    evaluation = {k: v for k, v in data.metrics.items() if k.startswith(EVAL_PREFIX)}
    return {"iteration": int(data.tags.get(TAG_ITERATION, 0)), **evaluation}


def _node_tags() -> dict[str, str]:
    import ray

    return {"mim4dd.node_id": ray.get_runtime_context().get_node_id(),
            "mim4dd.hostname": socket.gethostname()}


def train_trial(params: dict[str, str], context: LaunchContext, trials: dict[str, Trial]) -> None:
    """Tune's entry point; `params` is the trial's param-space entry, {"trial": key}."""
    trial = trials[params["trial"]]
    load_plugins(list(context.plugins))
    # A trial gets the cores Ray reserved for it, not every core of the node.
    torch.set_num_threads(max(1, int(context.cpus)))
    client = connect(context.tracking_uri)

    with tempfile.TemporaryDirectory(prefix="mim4dd-trial-") as tmp:
        workdir = Path(tmp)
        resumed = _resume_from(workdir, context.checkpoints_left.get(trial.key, []))
        restored, state = resumed if resumed else (None, None)
        saved = _read_json(restored / TRIAL_FILE) if restored else {}
        run = TrialRun.open(client, context.parent_run_id, context.sweep, trial,
                            run_id=saved.get("run_id"), tags=context.source_tags)
        if run.finished:  # finished just before a kill, before this launch counted it
            tune.report({**_final_metrics(run), "skipped": 1})
            return
        try:
            networks = _read_networks(restored / NETWORKS_FILE) if restored else []
            final = _run_and_log(run, trial, state, networks, workdir, context)
        except (KeyboardInterrupt, SystemExit) as exc:  # Tune stopping the trial (Ctrl-C)
            run.stop(f"interrupted ({type(exc).__name__}); relaunch the sweep to resume")
            raise
        except DETERMINISTIC_ERRORS as exc:
            reason = failure_reason(exc)
            run.fail(reason, details=traceback.format_exc())
            tune.report({FAILED: 1, "error": reason[:500]})  # returning: Tune does not retry
            return
        except Exception as exc:  # perhaps transient (a lost node, a full disk): Tune retries
            run.fail(f"{type(exc).__name__}: {exc}", details=traceback.format_exc())
            raise
        finally:
            # Tune reuses this worker for the next trial: hand this one's cached GPU memory back.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        tune.report(final)


def failure_reason(exc: BaseException) -> str:
    """One line for a trial that ended FAILED without a retry; for running out of GPU memory,
    what to lower (the first line of torch's message says how much was asked)."""
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.OutOfMemoryError):
        asked = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        reason = (f"out of GPU memory ({asked}); lower what one trial holds (batch_real, ipc, "
                  "model.width, eval.batch_size) or run fewer trials per GPU (a larger "
                  "resources.gpu), then relaunch")
    return reason


def _peak_memory() -> dict[str, float]:
    """The worker process's peak resident memory so far (it may have run earlier trials) and,
    on a GPU, the most this trial's tensors held at once."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _run_and_log(
    run: TrialRun, trial: Trial, state: dict | None, networks: list[NetResult], workdir: Path,
    context: LaunchContext,
) -> dict[str, float]:
    run.set_tags(_node_tags())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    reporter = _Reporter(run, trial, context.checkpoint_every, list(networks),
                         context.report_every_s)
    result = run_experiment(trial.config, callback=reporter, state=state,
                            checkpoint_every=context.checkpoint_every, evaluated=networks)
    iterations = int(result.synset.manifest.get("iterations_done", trial.config.iterations))
    assert result.evaluation is not None
    metrics = run.log_evaluation(result.evaluation)
    if context.random_baseline:  # computed once per data, IPC, seed and protocol, then cached
        baseline = random_metrics(random_baseline(trial.config))
        run.log_once(baseline)
        metrics |= baseline
    run.log_once(_peak_memory())

    out = workdir / "out"
    synset_dir = result.synset.save(out / SYNSET_PATH)
    results_file = result.write_results(out / RESULTS_FILE, sweep=context.sweep,
                                        trial_key=trial.key)
    run.log_outputs(synset_dir, results_file)
    run.finish()
    return {"iteration": iterations, **metrics}


__all__ = ["DETERMINISTIC_ERRORS", "FAILED", "NETWORKS_FILE", "LaunchContext", "train_trial"]
