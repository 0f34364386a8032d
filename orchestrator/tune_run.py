"""Ray and Tune for a sweep: a Ray session (connected, or started here) and one Tune run of the
unfinished trials.

One resume mechanism, ours: every launch is a fresh Tune experiment
(``<storage>/<sweep name>/launch-<time>-<pid>``, with the settings it ran with), and each
trial resumes from the newest checkpoint of its current config that any earlier launch left
(`tune_folder.resumable_checkpoints`: our JSON files and a tensors-only state file). Tune's own
experiment state is never restored: that unpickles its files, keeps the max_concurrent and
retries it was started with, and follows Tune's view of the newest checkpoint, which lags its
files after a kill. Once every trial of a launch has finished, earlier launches' folders go.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.board import Board, BoardFeed, TuneCallback, showing, trial_dirname
from orchestrator.expand import Trial
from orchestrator.spec import SweepSpec
from orchestrator.trainable import LaunchContext
from orchestrator.tune_folder import resumable_checkpoints

# Environment for the driver and every Ray worker (set before Ray starts).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0: no Tune tables, the rich board shows progress
    # One checkpoint kept means a state snapshot per trial checkpoint, by design (see below).
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
STORAGE_ENV = "MIM4DD_RAY_STORAGE"  # a folder all nodes share (NFS): multi-node checkpoints
# In each launch's folder: the Tune settings it ran with and its trials ({key: digest}).
SETTINGS_FILE = "mim4dd_launch.json"
LAUNCH_PREFIX = "launch-"  # <storage>/<sweep>/launch-<time>-<pid>: one Tune experiment each
# The embedded cluster listens on loopback only, so it runs without Ray's token authentication
# (a user's RAY_AUTH_MODE still wins). A cluster address gets none of this: its RAY_AUTH_* come
# from the user's environment (README, Security).
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled"}
BIND_ENV = "MIM4DD_RAY_BIND"  # "network": the embedded cluster may listen beyond loopback


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the stage and Tune: connected or started here, and stopped if started here."""
    import ray

    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    with _own_sigterm():
        started = _init_ray(address)
    try:
        yield
    finally:
        if started:
            with _own_sigterm():
                ray.shutdown()


@contextmanager
def _own_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler: `ray.init` puts in one that exits at once, which
    outlived the session and turned a SIGTERM while the sweep was set up or aggregated into an
    exit that left its runs RUNNING, instead of the launch's stop (`locks.stop_on_sigterm`)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread sets handlers
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


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
    if address in (None, "local"):  # "local" also starts one here: the same loopback cluster
        start_local(**kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def start_local(**kwargs: Any) -> None:
    """Start a fresh in-process Ray cluster (`ray.init(address="local")`, even when `ray start`
    left one on this machine) whose processes listen on 127.0.0.1 only; $MIM4DD_RAY_BIND=network
    lets it listen on the machine's address, with Ray's token authentication."""
    import ray
    from ray._private import ray_constants

    network = os.environ.get(BIND_ENV) == "network"
    if not network:
        for name, value in LOCAL_ENV.items():
            os.environ.setdefault(name, value)
    elif os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise RuntimeError(f"{BIND_ENV}=network exposes Ray to the network: it needs Ray's "
                           "token authentication (RAY_AUTH_MODE=token, or unset)")
    # Ray's gRPC servers (GCS, raylet, object manager, workers) and its agents listen on
    # 127.0.0.1 alone when the node's address is 127.0.0.1. Ray turns
    # `_node_ip_address="127.0.0.1"` into the machine's address, but picks loopback itself
    # where its cluster mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS
    # and Windows; read at import, so set here for the start only).
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = saved and network
    try:
        context = ray.init(address="local", include_dashboard=False, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    node = context.address_info["node_ip_address"]
    if not network and not ipaddress.ip_address(node).is_loopback:  # refused: stop it now
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster listened on {node}, not loopback; "
                           f"{BIND_ENV}=network allows that")


def run_tune(
    spec: SweepSpec, trials: list[Trial], remaining: list[Trial], context: LaunchContext,
    board: Board | None,
) -> tuple[dict[str, str], int]:
    """Run `remaining` on Ray Tune (Ray is running) as a fresh Tune experiment; returns Tune's
    errors by trial key and how many trials resume from a checkpoint an earlier launch left."""
    from ray import tune

    from orchestrator.trainable import FAILED, train_trial

    storage = Path(os.environ.get(STORAGE_ENV) or tracking.home() / "ray_results")
    sweep_folder = storage / spec.name
    digests = {t.key: t.digest for t in remaining}
    left = resumable_checkpoints(sweep_folder, digests)  # read before this launch writes any
    launch = f"{LAUNCH_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder = sweep_folder / launch
    folder.mkdir(parents=True)
    (folder / SETTINGS_FILE).write_text(json.dumps(
        {**_tune_settings(spec), "trials": digests}, indent=2) + "\n")
    tuner = tune.Tuner(
        tune.with_resources(
            # The typed trials travel through Ray's object store; Tune's param space (which
            # turns dataclasses into tuples) holds only their keys.
            tune.with_parameters(train_trial, context=replace(context, checkpoints_left=left),
                                 trials={t.key: t for t in trials}),
            {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
        ),
        param_space={"trial": tune.grid_search([t.key for t in remaining])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=launch, storage_path=str(sweep_folder), verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[BoardFeed(), PendingWatch(spec.pending_timeout_s)],
        ),
    )
    # Tune's stop message names Tuner.restore, which this service never uses; the launch's own
    # summary says what to do instead ("run the same command again").
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    with showing(board):
        results = tuner.fit()
    errors = {r.config["trial"]: _short(r.error) for r in results if r.error}
    if all(not r.error and not r.metrics.get(FAILED) for r in results):
        _drop_earlier_launches(sweep_folder, keep=folder)
    return errors, len(left)


def _drop_earlier_launches(sweep_folder: Path, keep: Path) -> None:
    """Every trial of this launch finished: the checkpoints earlier launches left are spent."""
    for earlier in sweep_folder.iterdir():
        if earlier != keep and earlier.is_dir():
            shutil.rmtree(earlier, ignore_errors=True)


class PendingTimeoutError(RuntimeError):
    """Trials waited for resources longer than the sweep's pending_timeout_s while none ran."""


class PendingWatch(TuneCallback):
    """Ends the Tune run when trials have waited `timeout` seconds for resources while no trial
    ran: whatever they ask for, the cluster does not free (a GPU it lacks, a node that left)."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.since: float | None = None

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        pending = [t for t in trials if t.status == "PENDING"]
        if self.timeout is None or not pending or any(t.status == "RUNNING" for t in trials):
            self.since = None
            return
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since > self.timeout:
            wanted = pending[0].placement_group_factory.required_resources
            raise PendingTimeoutError(
                f"{len(pending)} trial(s) waited over {self.timeout:g} s for resources while "
                f"none ran (each asks for {wanted}); the cluster never freed them "
                f"(pending_timeout_s)"
            )


def _tune_settings(spec: SweepSpec) -> dict[str, Any]:
    """The sweep file's Tune settings a launch ran with (in its `SETTINGS_FILE`)."""
    return {"max_concurrent": spec.max_concurrent, "retries": spec.retries}


def _short(error: Any) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:500] if text else repr(error)


__all__ = [
    "BIND_ENV", "LAUNCH_PREFIX", "LOCAL_ENV", "RAY_ENV", "SETTINGS_FILE", "STORAGE_ENV",
    "ray_session", "run_tune", "start_local",
]
