"""Ray and Tune for a sweep: a Ray session (connected, or started here) and one
Tune run of the unfinished trials, fresh or restored.

A Tune experiment folder (``<storage>/<sweep name>``) remembers the trials it was started
for (`TRIALS_FILE`: key -> config digest). A relaunch restores it with
`Tuner.restore(..., resume_errored=True)` when it was started for exactly the current trials
and holds every unfinished one; otherwise the folder is set aside and a fresh experiment
runs the unfinished trials only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.board import Board, BoardFeed, showing, trial_dirname
from orchestrator.expand import Trial
from orchestrator.spec import SweepSpec
from orchestrator.trainable import LaunchContext

# Environment for the driver and every Ray worker (set before Ray starts).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0: no Tune tables, the rich board shows progress
    # One checkpoint kept means a state snapshot per trial checkpoint, by design (see below).
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
STORAGE_ENV = "MIM4DD_RAY_STORAGE"  # a folder all nodes share (NFS): multi-node checkpoints
TRIALS_FILE = "mim4dd_trials.json"  # {key: digest} a Tune experiment folder was started with


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the stage and Tune: connected or started here, and stopped if started here."""
    import ray

    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    started = _init_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _init_ray(address: str | None) -> bool:
    """Connect to `address` (or $RAY_ADDRESS), else start a local cluster; True if we did."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": {k: os.environ[k] for k in RAY_ENV}},
        "log_to_driver": False,  # trial output stays in Ray's logs; failures go to MLflow
        "logging_level": logging.WARNING,
    }
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # "local": a fresh in-process cluster, even when `ray start` left one on this machine.
        address = "local"
        kwargs["include_dashboard"] = False
    ray.init(address=address, **kwargs)
    return True


def run_tune(
    spec: SweepSpec, trials: list[Trial], remaining: list[Trial], context: LaunchContext,
    board: Board | None,
) -> tuple[dict[str, str], bool]:
    """Run `remaining` on Ray Tune (Ray is running); returns Tune's errors by trial key and
    whether it resumed."""
    from ray import tune

    from orchestrator.trainable import train_trial

    trainable = tune.with_resources(
        # The typed trials travel through Ray's object store; Tune's param space (which turns
        # dataclasses into tuples) holds only their keys.
        tune.with_parameters(train_trial, context=context, trials={t.key: t for t in trials}),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    storage = Path(os.environ.get(STORAGE_ENV) or tracking.home() / "ray_results")
    folder = storage / spec.name
    resumed = _restorable(folder, trials, remaining)
    if resumed:
        tuner = tune.Tuner.restore(str(folder), trainable, resume_errored=True)
    else:
        if folder.exists():  # a different set of trials: keep it, out of the way
            folder.rename(folder.with_name(f"{spec.name}.replaced-{int(time.time())}"))
        folder.mkdir(parents=True)
        keys = {t.key: t.digest for t in remaining}
        (folder / TRIALS_FILE).write_text(json.dumps(keys, indent=2) + "\n")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.key for t in remaining])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(storage), verbose=0,
                failure_config=tune.FailureConfig(max_failures=spec.retries),
                # One checkpoint kept; Tune then saves its experiment state after every
                # trial checkpoint, so a killed sweep resumes from the newest one.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[BoardFeed()],
            ),
        )
    with showing(board):
        results = tuner.fit()
    errors = {r.config["trial"]: _short(r.error) for r in results if r.error}
    return errors, resumed


def _restorable(folder: Path, trials: list[Trial], remaining: list[Trial]) -> bool:
    """A Tune experiment in `folder` started for these trials and holding all unfinished."""
    from ray import tune

    try:
        saved = json.loads((folder / TRIALS_FILE).read_text())
    except (OSError, ValueError):
        return False
    current = {t.key: t.digest for t in trials}
    holds_remaining = all(saved.get(t.key) == t.digest for t in remaining)
    only_current = all(current.get(k) == d for k, d in saved.items())
    return holds_remaining and only_current and tune.Tuner.can_restore(folder)


def _short(error: Any) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:500] if text else repr(error)


__all__ = ["RAY_ENV", "STORAGE_ENV", "TRIALS_FILE", "ray_session", "run_tune"]
