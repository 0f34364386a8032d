"""`mim4dd-sweep evaluate`: a sweep's finished sets on more architectures, without distilling
again, logged into each trial's own run.

One Ray task per finished trial, on the embedded cluster or the one at `address` (the sets of a
45-trial sweep train hundreds of networks: on a cluster they run where the GPUs are, not on the
machine that typed the command). Each set is pulled (sha256-verified) and evaluated with its
trial's own protocol (`eval.*`) on the requested architectures its run does not hold yet. Every network's metrics are logged as it finishes and an architecture's summary
(mean, std) last, at step 0 under `arch_metric` names, so an architecture whose summary a run
holds is skipped, a stopped `evaluate` resumes from the networks the runs hold, and no metric
is ever logged twice. A trial's own headline architecture is not retrained: its logged numbers
are copied under its architecture's names, so that the report's table has its column.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mim4dd.config import Config
from mim4dd.evaluate import NetResult, network_metrics, network_seeds
from mim4dd.metrics import EVAL_PREFIX, TEST_ACC_MEAN, arch_metric, metric_architecture, net_metric
from mim4dd.experiment import evaluate_synset
from mim4dd.synset import SyntheticSet
from mim4dd.zoo import ARCHITECTURES, DEFAULT_ARCHITECTURE, unknown_architecture_message
from orchestrator import queries, tracking
from orchestrator.locks import SweepLockedError, sweep_lock
from orchestrator.trial_run import TrialRun


def evaluate_sweep(
    name: str, models: str | list[str], tracking_uri: str | None = None,
    say: Callable[[str], None] = print, address: str | None = None,
    resources: Mapping[str, float] | None = None,
) -> list[dict[str, str]]:
    """Evaluate every finished trial of sweep `name` (current configs) on `models` (a list or
    comma-separated), a Ray task each (`resources`: Ray's num_cpus / num_gpus per task, 1 CPU
    by default) on the cluster at `address` (or $RAY_ADDRESS; else one started here); one row
    per trial: the architectures added, those it had already, and the error of a trial that
    could not be evaluated. `say` hears each trial's progress lines as its task ends."""
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if not models:
        raise ValueError("name at least one architecture")
    for arch in models:
        if arch not in ARCHITECTURES:
            raise ValueError(unknown_architecture_message(arch))
    client, parent = queries.open_sweep(name, tracking_uri)
    uri = tracking.resolve_tracking_uri(tracking_uri)  # the workers log to the same store
    with sweep_lock(name, tracking.home()):  # no launch (or evaluate) logs to these runs now
        finished = queries.finished_trial_runs(client, parent)
        return _run_tasks(sorted(finished.items()), models, uri, say, address,
                          dict(resources or {"num_cpus": 1}))


def _run_tasks(
    runs: list[tuple[str, Any]], models: list[str], uri: str, say: Callable[[str], None],
    address: str | None, resources: dict[str, float],
) -> list[dict[str, str]]:
    """Every run's evaluation as a Ray task; rows in the order of `runs`."""
    import ray

    from orchestrator.tune_run import ray_session

    say(f"{len(runs)} finished trial(s): a Ray task each ({resources})")
    with ray_session(address):
        task = ray.remote(_evaluate_task).options(**resources)
        threads = max(1, int(resources.get("num_cpus", 1)))
        pending = {task.remote(run.info.run_id, key, models, uri, threads): key
                   for key, run in runs}
        rows: dict[str, dict[str, str]] = {}
        while pending:
            [done], _ = ray.wait(list(pending))
            key = pending.pop(done)
            try:
                rows[key], lines = ray.get(done)
            except Exception as exc:  # a lost worker, say: this trial only, the rest go on
                rows[key], lines = _row(key, error=f"{type(exc).__name__}: {exc}"[:500]), []
            for line in lines:
                say(f"{key}: {line}")
            say(f"{len(rows)}/{len(runs)} trials evaluated")
    return [rows[key] for key, _ in runs]


def _row(key: str, added: str = "", there: str = "", error: str = "") -> dict[str, str]:
    return {"trial": key, "added": added, "already there": there, "error": error}


def _evaluate_task(
    run_id: str, key: str, models: list[str], uri: str, threads: int,
) -> tuple[dict[str, str], list[str]]:
    """One trial's evaluation in a Ray worker: its row and its progress lines."""
    torch.set_num_threads(threads)  # the cores Ray reserved for it, not every core of the node
    client = tracking.connect(uri)
    lines: list[str] = []
    try:
        added, there = _evaluate_run(client, client.get_run(run_id), models, uri, lines.append)
    except ValueError as exc:  # an architecture these images do not fit, a bad set
        return _row(key, error=str(exc)), lines
    return _row(key, ", ".join(added), ", ".join(there)), lines


def _headline(run: Any) -> str:
    """The architecture the trial's unnamed `eval/...` metrics are of (its eval.models[0])."""
    models = json.loads(run.data.params.get("eval.models", "null")) or [DEFAULT_ARCHITECTURE]
    return models[0]


def _evaluate_run(
    client: Any, run: Any, models: list[str], tracking_uri: str | None,
    say: Callable[[str], None],
) -> tuple[list[str], list[str]]:
    have = dict(run.data.metrics)
    once = TrialRun(client, run)  # `log_once`: a name the run holds is never logged again
    there = [a for a in models if arch_metric(a, TEST_ACC_MEAN) in have]
    todo = [a for a in models if a not in there]
    headline = _headline(run)
    if headline in todo:  # trained by the trial already: its numbers under its own names
        once.log_once({arch_metric(headline, k): v for k, v in have.items()
                       if k.startswith(EVAL_PREFIX) and metric_architecture(k)[0] is None})
        todo.remove(headline)
    if todo:
        with tempfile.TemporaryDirectory(prefix="mim4dd-evaluate-") as folder:
            synset = SyntheticSet.load(queries.pull(run.info.run_id, Path(folder),
                                                    tracking_uri))
            config = Config.from_saved(synset.manifest["config"])
            config = config.model_copy(
                update={"eval": config.eval.model_copy(update={"models": todo})})
            done = _done(have, config)
            say(f"evaluating on {', '.join(todo)} ({len(done)} networks done before)")

            def log_network(net: NetResult) -> None:
                # Named as in an evaluation headed by the trial's own architecture: never the
                # unnamed headline metrics, which stay the trial's.
                once.log_once(network_metrics(net, [headline, *todo]))
                say(f"{net.architecture} network {net.index}: {100 * net.test_accuracy:.2f} %")

            result = evaluate_synset(synset, config, done=done, on_network=log_network)
        once.log_once(result.architecture_metrics())  # the summaries; the networks are there
    added = [a for a in models if a not in there]
    return added, there


def _done(have: Mapping[str, float], config: Config) -> list[NetResult]:
    """The networks a stopped `evaluate` logged already, read back from the run's metrics."""
    done, seeds = [], network_seeds(config.eval, config.seed)
    for arch in config.eval.models:
        for index, seed in enumerate(seeds):
            test = have.get(arch_metric(arch, net_metric("test", index)))
            val = have.get(arch_metric(arch, net_metric("val", index)))
            if test is not None:
                done.append(NetResult(arch, index, seed, test / 100,
                                      None if val is None else val / 100))
    return done


__all__ = ["SweepLockedError", "evaluate_sweep"]  # raised when a launch of the sweep runs
