"""The sweep service: launch a validated sweep on Ray Tune, track it in MLflow, summarise it.

`launch` is idempotent. Run it again after anything (a crash, a SIGKILL, a partial failure):

* trials with a FINISHED child run in MLflow (same key and config digest) are never re-run;
* when the sweep's Tune experiment folder (``<home>/ray_results/<name>``) can be restored and
  was started for the same trials, it is resumed with `Tuner.restore(..., resume_errored=True)`:
  unfinished and errored trials continue from their latest Tune checkpoint;
* otherwise a fresh Tune experiment runs only the unfinished trials;
* either way a trial continues its existing child run (the trainable finds it by the run id
  in its checkpoint, else by trial key), so no trial ever gets a second child run.

Before Tune starts, the expert stage (`orchestrator.experts`) makes every expert buffer the
unfinished trajectory-matching trials need complete; if it cannot, no trial starts.

The CLI (`orchestrator.cli`) only parses arguments and prints what these functions return.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator import aggregate, experts, tracking
from orchestrator.spec import SweepSpec, Trial, trial_table

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
TAG_BUFFERS = "mim4dd.expert_buffers"  # digests of the expert buffers the trials read
TAG_TOTAL, TAG_FINISHED, TAG_FAILED = (
    "mim4dd.trials_total", "mim4dd.trials_finished", "mim4dd.trials_failed"
)


@dataclass
class SweepOutcome:
    name: str
    status: str  # FINISHED, FAILED, KILLED, or DRY_RUN
    total: int
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    skipped: list[str] = field(default_factory=list)  # finished before this launch
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason
    unfinished: list[str] = field(default_factory=list)
    resumed: bool = False  # a previous Tune experiment was restored
    summary: pd.DataFrame | None = None
    table: list[dict[str, Any]] = field(default_factory=list)  # dry run rows
    buffers: list[dict[str, Any]] = field(default_factory=list)  # dry run: expert buffers


# --- progress on the terminal ----------------------------------------------------------------


class _Board:
    """A live rich view of the sweep: counts, and one line per running or failed trial."""

    MAX_ROWS = 20

    def __init__(self, name: str, trials: list[Trial], skipped: set[str], console: Console):
        self.name = name
        self.iterations = {t.key: t.config.iterations for t in trials}
        self.state = {t.key: ("done" if t.key in skipped else "pending") for t in trials}
        self.detail: dict[str, str] = {}
        self.console = console
        # On a terminal, a live table; in a log file, one plain line per change of state.
        self.live = (Live(self.render(), console=console, auto_refresh=False, transient=False)
                     if console.is_terminal else None)
        self._last = 0.0

    def update(self, key: str, state: str | None = None, detail: str | None = None) -> None:
        if key not in self.state:
            return
        if state:
            self.state[key] = state
        if detail is not None:
            self.detail[key] = detail
        if self.live is None:
            if state:
                done = list(self.state.values()).count("done")
                self.console.print(f"[{done}/{len(self.state)} done] {escape(key)}: {state}"
                                   f"{' - ' + escape(detail) if detail else ''}", highlight=False)
            return
        now = time.monotonic()
        if state or now - self._last > 0.25:  # repaint on news, else at most 4 times a second
            self._last = now
            self.live.update(self.render(), refresh=True)

    def render(self) -> Group:
        counts = {s: list(self.state.values()).count(s)
                  for s in ("done", "running", "retrying", "failed", "pending")}
        head = (f"[bold]{self.name}[/]: {counts['done']}/{len(self.state)} done, "
                f"{counts['running'] + counts['retrying']} running, "
                f"[red]{counts['failed']} failed[/], {counts['pending']} pending")
        table = Table(box=None, pad_edge=False)
        for column in ("trial", "state", "progress"):
            table.add_column(column)
        shown = [k for k, s in self.state.items() if s in ("running", "retrying", "failed")]
        for key in shown[: self.MAX_ROWS]:
            state = self.state[key]
            style = {"failed": "red", "retrying": "yellow"}.get(state, "cyan")
            table.add_row(escape(key), f"[{style}]{state}[/]", escape(self.detail.get(key, "")))
        return Group(head, table) if shown else Group(head)


_BOARD: _Board | None = None  # set by launch; Tune callbacks are pickled, so they look it up


def _key(trial: Any) -> str:
    return trial.config.get("trial", {}).get("key", str(trial))


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency of the sweep extra
    _TuneCallback = object  # type: ignore[assignment,misc]


class _BoardFeed(_TuneCallback):
    """Tune events -> the board. Stateless, so a restored experiment can unpickle it."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "running", "starting")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _BOARD and "loss" in result:
            key = _key(trial)
            total = _BOARD.iterations.get(key, 0)
            _BOARD.update(key, None, f"{result.get('iteration', 0)}/{total}  "
                                     f"loss {result['loss']:.4g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "done", "")

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "retrying", _error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "failed", _error_text(trial))


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        lines = []
    return lines[-1][:120] if lines else "error"


def trial_dirname(trial: Any) -> str:
    """Tune trial folders named after the trial key (readable, and findable by key)."""
    slug = re.sub(r"[^A-Za-z0-9_.=,-]", "_", _key(trial))[:80]
    return f"{slug}_{trial.trial_id}"


# --- launching -------------------------------------------------------------------------------


def launch(
    spec: SweepSpec, *, dry_run: bool = False, progress: bool = True,
    console: Console | None = None,
) -> SweepOutcome:
    """Run every unfinished trial of `spec`, then aggregate; see the module docstring."""
    trials = spec.trials()
    if dry_run:  # nothing started, nothing logged
        return SweepOutcome(spec.name, "DRY_RUN", len(trials), table=trial_table(spec),
                            buffers=experts.describe(trials))

    uri = tracking.resolve_tracking_uri(spec.tracking_uri)
    client = tracking.connect(uri)
    experiment_id = tracking.ensure_experiment(client, spec.experiment_name, uri)
    note = {tracking.TAG_NOTE: spec.description} if spec.description else {}
    parent = tracking.open_sweep_run(client, experiment_id, spec.name,
                                     {TAG_TOTAL: len(trials), **note})
    parent_id = parent.info.run_id
    outcome = SweepOutcome(spec.name, "RUNNING", len(trials), uri, parent_id)
    try:
        _log_spec(client, parent_id, spec)
        digests = {t.key: t.config_digest for t in trials}
        done = tracking.finished_trial_keys(client, parent, digests)
        outcome.skipped = [t.key for t in trials if t.key in done]
        remaining = [t for t in trials if t.key not in done]
        tune_errors: dict[str, str] = {}
        if remaining:
            context = {
                "sweep": spec.name, "tracking_uri": uri, "parent_run_id": parent_id,
                "checkpoint_every": spec.checkpoint_every, "cpus": spec.resources.cpu,
            }
            console = console or Console(stderr=True)
            if (spec.ray_address or os.environ.get("RAY_ADDRESS")) and tracking.is_embedded(uri):
                console.print(f"[yellow]warning:[/] trials on other machines cannot reach {uri}; "
                              "give a tracking server with --tracking-uri", highlight=False)
            board = _Board(spec.name, trials, done, console) if progress else None
            with _ray_session(spec.ray_address):
                log = _buffer_logger(client, experiment_id, spec.name)
                buffers = experts.prepare(spec, remaining, console, log)
                if buffers:
                    digests = " ".join(sorted({b.digest for b in buffers}))
                    tracking.set_tags(client, parent_id, {TAG_BUFFERS: digests})
                tune_errors, outcome.resumed = _run_tune(spec, trials, remaining, context, board)
            _end_orphans(client, parent)
        _account(client, parent, trials, tune_errors, outcome)
        outcome.summary = _aggregate(client, parent, trials)
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{exc!r}"
        status = "KILLED"
        if isinstance(exc, experts.ExpertStageError):
            status, reason = "FAILED", f"expert stage failed, no trial started: {exc}"
        try:
            _end_orphans(client, parent)
        finally:
            tracking.end_run(client, parent_id, status, f"{reason}; relaunch to resume")
        raise
    _end_parent(client, parent_id, outcome)
    return outcome


def _log_spec(client: Any, run_id: str, spec: SweepSpec) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.json"
        path.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
        client.log_artifact(run_id, str(path))


def prepare_experts(spec: SweepSpec, console: Console | None = None) -> list[experts.Buffer]:
    """Only the expert stage, for every trial of `spec`; logged in the sweep's experiment."""
    trials = [t for t in spec.trials() if experts.needs_experts(t)]
    if not trials:
        return []
    uri = tracking.resolve_tracking_uri(spec.tracking_uri)
    client = tracking.connect(uri)
    experiment_id = tracking.ensure_experiment(client, spec.experiment_name, uri)
    with _ray_session(spec.ray_address):
        return experts.prepare(spec, trials, console,
                               _buffer_logger(client, experiment_id, spec.name))


def _buffer_logger(client: Any, experiment_id: str, sweep: str) -> Any:
    """The stage's `on_sealed`: each buffer it sealed becomes a small MLflow run."""
    def log(buffer: experts.Buffer, manifest: str) -> None:
        tracking.log_expert_buffer(client, experiment_id, buffer.digest, buffer.directory,
                                   manifest, sweep)
    return log


@contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
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


def _run_tune(
    spec: SweepSpec, trials: list[Trial], remaining: list[Trial], context: dict[str, Any],
    board: _Board | None,
) -> tuple[dict[str, str], bool]:
    """Run `remaining` on Ray Tune (Ray is running); returns Tune's errors by trial key and
    whether it resumed."""
    from ray import tune

    from orchestrator.trainable import payload, train_trial

    global _BOARD
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, context=context),
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
        keys = {t.key: t.config_digest for t in remaining}
        (folder / TRIALS_FILE).write_text(json.dumps(keys, indent=2) + "\n")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([payload(t) for t in remaining])},
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
                callbacks=[_BoardFeed()],
            ),
        )
    _BOARD = board
    if board and board.live:
        board.live.start()
    try:
        results = tuner.fit()
    finally:
        if board and board.live:
            board.live.stop()
        _BOARD = None
    errors = {r.config["trial"]["key"]: _short(r.error) for r in results if r.error}
    return errors, resumed


def _restorable(folder: Path, trials: list[Trial], remaining: list[Trial]) -> bool:
    """A Tune experiment in `folder` started for these trials and holding all unfinished."""
    from ray import tune

    try:
        saved = json.loads((folder / TRIALS_FILE).read_text())
    except (OSError, ValueError):
        return False
    current = {t.key: t.config_digest for t in trials}
    holds_remaining = all(saved.get(t.key) == t.config_digest for t in remaining)
    only_current = all(current.get(k) == d for k, d in saved.items())
    return holds_remaining and only_current and tune.Tuner.can_restore(folder)


def _short(error: Any) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:500] if text else repr(error)


def _end_orphans(client: Any, parent: Any) -> None:
    """End as KILLED the child runs still RUNNING once Tune returned: their trial process was
    stopped (Ctrl-C) or died before it could end the run itself."""
    for run in tracking.child_runs(client, parent):
        if run.info.status == "RUNNING":
            tracking.end_run(client, run.info.run_id, "KILLED",
                             "interrupted; relaunch the sweep to resume")


def _account(
    client: Any, parent: Any, trials: list[Trial], tune_errors: dict[str, str],
    outcome: SweepOutcome,
) -> None:
    """Sort every trial into finished / failed / unfinished from MLflow (the record)."""
    digests = {t.key: t.config_digest for t in trials}
    runs = tracking.runs_by_key(tracking.child_runs(client, parent), digests, status=None)
    for trial in trials:
        run = runs.get(trial.key)
        status = run.info.status if run else None
        if status == "FINISHED":
            outcome.finished.append(trial.key)
        elif status == "KILLED":  # stopped by Ctrl-C: resumable, not broken
            outcome.unfinished.append(trial.key)
        elif status == "FAILED" or trial.key in tune_errors:
            reason = run.data.tags.get(tracking.TAG_FAILURE) if run else None
            outcome.failed[trial.key] = reason or tune_errors.get(trial.key, "failed")
        else:
            outcome.unfinished.append(trial.key)


def _aggregate(client: Any, parent: Any, trials: list[Trial]) -> pd.DataFrame | None:
    digests = {t.key: t.config_digest for t in trials}
    runs = tracking.runs_by_key(tracking.child_runs(client, parent), digests, "FINISHED")
    if not runs:
        return None
    frame, axes = aggregate.trial_frame(runs.values())
    summary = aggregate.summarize(frame, axes)
    with tempfile.TemporaryDirectory() as folder:
        name = parent.data.tags.get(tracking.TAG_SWEEP, "")
        files = aggregate.write_report(frame, summary, Path(folder), name)
        aggregate.log_report(client, parent.info.run_id, summary, files)
    return summary


def _end_parent(client: Any, run_id: str, outcome: SweepOutcome) -> None:
    counts = {TAG_TOTAL: outcome.total, TAG_FINISHED: len(outcome.finished),
              TAG_FAILED: len(outcome.failed)}
    tracking.set_tags(client, run_id, counts)
    step = int(time.time())
    for name, value in counts.items():
        client.log_metric(run_id, name.removeprefix("mim4dd."), value, step=step)
    if outcome.unfinished:
        outcome.status = "KILLED"
        reason = f"{len(outcome.unfinished)} trials did not finish; relaunch to resume"
    elif outcome.total and not outcome.finished:
        outcome.status = "FAILED"
        first = next(iter(outcome.failed.values()), "")
        reason = f"all {outcome.total} trials failed; first: {first}"
    else:
        outcome.status, reason = "FINISHED", None
    tracking.end_run(client, run_id, outcome.status, reason)


# --- looking at a sweep ----------------------------------------------------------------------


@dataclass
class SweepStatus:
    name: str
    run_status: str
    total: int
    trials: list[dict[str, Any]]  # key, status, iteration, iterations, test_acc, failure

    def count(self, status: str) -> int:
        return sum(1 for t in self.trials if t["status"] == status)

    @property
    def pending(self) -> int:
        return max(0, self.total - len(self.trials))


def _open_sweep(name: str, tracking_uri: str | None) -> tuple[Any, Any]:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if not tracking.store_exists(uri):  # looking must not create an empty store
        raise LookupError(f"no sweep named {name!r}: there is no tracking store at {uri}")
    client = tracking.connect(uri)
    parent = tracking.find_sweep_run(client, name)
    if parent is None:
        raise LookupError(f"no sweep named {name!r} in {uri}")
    return client, parent


def sweep_status(name: str, tracking_uri: str | None = None) -> SweepStatus:
    client, parent = _open_sweep(name, tracking_uri)
    latest = tracking.latest_per_key(tracking.child_runs(client, parent), status=None)
    trials = []
    for key, run in sorted(latest.items()):
        metrics, params = run.data.metrics, run.data.params
        trials.append({
            "key": key, "status": run.info.status,
            "iteration": int(metrics.get("iteration", 0)),
            "iterations": int(tracking.parse_value(params.get("iterations", "0")) or 0),
            "test_acc": metrics.get("eval/test_acc_mean"),
            "failure": run.data.tags.get(tracking.TAG_FAILURE, ""),
        })
    total = int(parent.data.tags.get(TAG_TOTAL, len(trials)))
    return SweepStatus(name, parent.info.status, total, trials)


def sweep_report(name: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """The aggregated table of a sweep's finished trials (newest run per trial key)."""
    client, parent = _open_sweep(name, tracking_uri)
    frame, axes = aggregate.trial_frame(tracking.child_runs(client, parent))
    return aggregate.summarize(frame, axes)


def pull_set(
    target: str, out_dir: str | os.PathLike, tracking_uri: str | None = None,
    values: dict[str, Any] | None = None,
) -> tuple[Path, str]:
    """Pull by run id, or by sweep name plus setting values; returns (folder, run id)."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    if not values and re.fullmatch(r"[0-9a-f]{32}", target):
        return tracking.pull(target, out_dir, tracking_uri), target
    client, parent = _open_sweep(target, tracking_uri)
    run = tracking.find_trial_run(tracking.child_runs(client, parent), values=values)
    return tracking.pull(run.info.run_id, out_dir, tracking_uri), run.info.run_id


def ui_command(tracking_uri: str | None, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for a store (embedded: its sqlite db and artifacts)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", host, "--port", str(port)]
    if root := tracking.artifact_root(uri):
        command += ["--default-artifact-root", root]
    return command


__all__ = [
    "SweepOutcome",
    "SweepStatus",
    "launch",
    "pull_set",
    "sweep_report",
    "sweep_status",
    "trial_dirname",
    "ui_command",
]
