"""The sweep service: launch a validated sweep on Ray Tune, track it in MLflow, summarise it.

`launch` is idempotent. Run it again after anything (a crash, a SIGKILL, a partial failure):

* trials with a FINISHED child run in MLflow (same key and config digest) are never re-run;
* a fresh Tune experiment runs only the unfinished trials, each from the newest checkpoint of
  its current config that an earlier launch left under ``<home>/ray_results/<name>/``
  (`tune_run`);
* a trial continues its existing child run (the trainable finds it by the run id in its
  checkpoint, else by trial key and digest), so no trial ever gets a second child run.

Before Tune starts, the expert stage (`orchestrator.experts`) makes every expert buffer the
unfinished trajectory-matching trials need complete; if it cannot, no trial starts.

Its parts live apart: the terminal board (`board`), Ray and Tune (`tune_run`), a trial's own
run (`trainable`, `trial_run`), and reading a sweep back (`queries`: status, report, pull).
The CLI (`orchestrator.cli`) only parses arguments and prints what these functions return.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from mim4dd.bases import plugin_modules
from orchestrator import (
    aggregate, cross_arch, experts, lineage, preflight, queries, retrying, tracking, ui_view,
)
from orchestrator.board import Board
from orchestrator.expand import Trial
from orchestrator.locks import sweep_lock
from orchestrator.spec import SweepSpec, trial_table
from orchestrator.trainable import LaunchContext
from orchestrator.trial_run import ERROR_FILE
from orchestrator.tune_run import PendingTimeoutError, ray_session, run_tune


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
    resumed: int = 0  # trials that continue from a checkpoint an earlier launch left
    # finished before under other settings, so run again; the earlier runs stay, unreported
    changed: list[str] = field(default_factory=list)
    summary: pd.DataFrame | None = None
    table: list[dict[str, Any]] = field(default_factory=list)  # dry run rows
    buffers: list[dict[str, Any]] = field(default_factory=list)  # dry run: expert buffers

    def counts(self) -> str:
        """The launch in one line: its status and what became of its trials."""
        resumed = f"; {self.resumed} resumed from checkpoints" if self.resumed else ""
        changed = (f"; {len(self.changed)} run again with changed settings (their earlier "
                   "results stay in the store, not reported)") if self.changed else ""
        return (f"{self.status}; {len(self.finished)}/{self.total} finished ({len(self.skipped)} "
                f"before this launch), {len(self.failed)} failed, {len(self.unfinished)} "
                f"unfinished{resumed}{changed}")


def launch(
    spec: SweepSpec, *, dry_run: bool = False, progress: bool = True,
    console: Console | None = None, source: Path | None = None,
) -> SweepOutcome:
    """Run every unfinished trial of `spec`, then aggregate; see the module docstring.
    `source` is the sweep file, recorded in MLflow. Raises, before anything starts or is
    logged, SweepLockedError while another launch of it runs and PreflightError when its data
    or resources cannot serve its trials."""
    trials = spec.trials()  # expanded when the spec was loaded
    if dry_run:  # nothing started, nothing logged
        return SweepOutcome(spec.name, "DRY_RUN", len(trials), table=trial_table(spec),
                            buffers=experts.describe(trials))
    with _writable_home(spec), sweep_lock(spec.name, tracking.home()):
        if not _cluster_address(spec):  # the trials run here: check against this machine
            preflight.check_local_resources(spec.resources, trials)
            preflight.check_data(trials)
        return _launch(spec, trials, progress, console, source)


@contextmanager
def _writable_home(spec: SweepSpec) -> Iterator[None]:
    """A full disk or a read-only home (or store) is one StoreError line, not pages."""
    try:
        yield
    except Exception as exc:
        retrying.refuse_unwritable(exc, tracking.resolve_tracking_uri(spec.tracking_uri))
        raise


def _cluster_address(spec: SweepSpec) -> str | None:
    return spec.ray_address or os.environ.get("RAY_ADDRESS") or None


def _launch(
    spec: SweepSpec, trials: list[Trial], progress: bool, console: Console | None,
    source: Path | None,
) -> SweepOutcome:
    uri = tracking.resolve_tracking_uri(spec.tracking_uri)
    console = console or Console(stderr=True)
    _await_server(uri, console)
    client = tracking.connect(uri)
    experiment_id = tracking.ensure_experiment(client, spec.experiment_name, uri)
    ui_view.save(client, experiment_id, spec.name, lineage.axes(spec))
    source_tags = lineage.source_tags(source)  # the parent's and every trial's
    tags = {tracking.TAG_TOTAL: len(trials), tracking.TAG_NOTE: lineage.describe_sweep(spec),
            **source_tags}
    parent = tracking.open_sweep_run(client, experiment_id, spec.name, tags,
                                     params=lineage.grid_params(spec))
    parent_id = parent.info.run_id
    outcome = SweepOutcome(spec.name, "RUNNING", len(trials), uri, parent_id)
    digests = {t.key: t.digest for t in trials}
    try:
        _log_spec(client, parent_id, spec, source)
        queries.record_trials(client, parent_id, trials)
        runs = tracking.child_runs(client, parent)
        done = set(tracking.runs_by_key(runs, digests, "FINISHED"))
        outcome.skipped = [t.key for t in trials if t.key in done]
        outcome.changed = sorted(set(tracking.latest_per_key(runs, "FINISHED")) & set(digests)
                                 - done)
        remaining = [t for t in trials if t.key not in done]
        tune_errors: dict[str, str] = {}
        if remaining:
            context = LaunchContext(spec.name, uri, parent_id, spec.checkpoint_every,
                                    spec.resources.cpu, tuple(plugin_modules()), source_tags,
                                    random_baseline=spec.random_baseline,
                                    report_every_s=spec.report_every_s)
            if _cluster_address(spec) and tracking.is_embedded(uri):
                console.print(f"[yellow]warning:[/] trials on other machines cannot reach {uri}; "
                              "give a tracking server with --tracking-uri", highlight=False)
            board = Board(spec.name, trials, done, console) if progress else None
            with ray_session(spec.ray_address):
                if _cluster_address(spec):
                    preflight.check_cluster_resources(spec.resources, remaining)
                log = _buffer_logger(client, experiment_id, spec.name)
                buffers = experts.prepare(spec, remaining, console, log)
                if buffers:
                    used = " ".join(sorted({b.digest for b in buffers}))
                    tracking.set_tags(client, parent_id, {tracking.TAG_BUFFERS: used})
                tune_errors, outcome.resumed = run_tune(spec, trials, remaining, context, board)
            _end_orphans(client, parent)
        _account(client, parent, trials, tune_errors, outcome)
        outcome.summary = _aggregate(client, parent, digests)
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{exc!r}"
        status = "KILLED"
        if isinstance(exc, experts.ExpertStageError):
            status, reason = "FAILED", f"expert stage failed, no trial started: {exc}"
        elif isinstance(exc, preflight.PreflightError):
            status, reason = "FAILED", f"no trial started: {exc}"
        elif isinstance(exc, PendingTimeoutError):
            status, reason = "FAILED", str(exc)
        try:
            _end_orphans(client, parent)
        finally:
            tracking.end_run(client, parent_id, status, f"{reason}; relaunch to resume")
        raise
    _end_parent(client, parent, outcome)
    return outcome


def _log_spec(client: Any, run_id: str, spec: SweepSpec, source: Path | None) -> None:
    client.log_dict(run_id, spec.model_dump(mode="json"), "spec.json")
    if source is not None:  # the file as written, comments and all
        client.log_text(run_id, Path(source).read_text(encoding="utf-8"), lineage.SWEEP_FILE)


def prepare_experts(spec: SweepSpec, console: Console | None = None) -> list[experts.Buffer]:
    """Only the expert stage, for every trial of `spec`; logged in the sweep's experiment."""
    trials = [t for t in spec.trials() if experts.needs_experts(t)]
    if not trials:
        return []
    uri = tracking.resolve_tracking_uri(spec.tracking_uri)
    with _writable_home(spec), sweep_lock(spec.name, tracking.home()):
        _await_server(uri, console or Console(stderr=True))
        client = tracking.connect(uri)
        experiment_id = tracking.ensure_experiment(client, spec.experiment_name, uri)
        with ray_session(spec.ray_address):
            return experts.prepare(spec, trials, console,
                                   _buffer_logger(client, experiment_id, spec.name))


def _await_server(uri: str, console: Console) -> None:
    retrying.await_server(
        uri, lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))


def _buffer_logger(client: Any, experiment_id: str, sweep: str) -> Any:
    """The stage's `on_sealed`: each buffer it sealed becomes a small MLflow run."""
    def log(buffer: experts.Buffer, manifest: str) -> None:
        tracking.log_expert_buffer(client, experiment_id, buffer.digest, buffer.directory,
                                   manifest, sweep)
    return log


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
    digests = {t.key: t.digest for t in trials}
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
            reason = (reason or tune_errors.get(trial.key, "failed")).splitlines()[0]
            where = f" (traceback: {ERROR_FILE} of run {run.info.run_id})" if run else ""
            outcome.failed[trial.key] = reason[:300] + where
        else:
            outcome.unfinished.append(trial.key)


def _launch_step(parent: Any) -> int:
    """The step this launch logs the parent's metrics at (`tracking.TAG_LAUNCH`)."""
    return int(parent.data.tags.get(tracking.TAG_LAUNCH, 1))


def _aggregate(client: Any, parent: Any, digests: dict[str, str]) -> pd.DataFrame | None:
    """The summary of the finished trials, also written and logged as the parent's report."""
    found = queries.summarize(tracking.child_runs(client, parent), digests)
    if found is None:
        return None
    frame, summary = found
    with tempfile.TemporaryDirectory() as folder:
        name = parent.data.tags.get(tracking.TAG_SWEEP, "")
        files = aggregate.write_report(frame, summary, Path(folder), name)
        table = cross_arch.summarize(frame, aggregate.cell_axes(summary))
        files += cross_arch.write(table, Path(folder), name)
        aggregate.log_report(client, parent.info.run_id, summary, files, _launch_step(parent))
    return summary


def _end_parent(client: Any, parent: Any, outcome: SweepOutcome) -> None:
    run_id = parent.info.run_id
    counts = {tracking.TAG_TOTAL: outcome.total, tracking.TAG_FINISHED: len(outcome.finished),
              tracking.TAG_FAILED: len(outcome.failed)}
    tracking.set_tags(client, run_id, counts)
    step = _launch_step(parent)
    for name, value in counts.items():
        client.log_metric(run_id, name.removeprefix("mim4dd."), value, step=step)
    if outcome.unfinished:
        outcome.status = "KILLED"
        reason = f"{len(outcome.unfinished)} trials did not finish; relaunch to resume"
    elif outcome.failed:  # a sweep with failed trials is not a finished sweep
        outcome.status = "FAILED"
        first = next(iter(outcome.failed.values()))
        reason = (f"{len(outcome.failed)} of {outcome.total} trials failed; first: {first}; "
                  "fix the cause, then relaunch to retry them")
    else:
        outcome.status, reason = "FINISHED", None
    tracking.end_run(client, run_id, outcome.status, reason)


__all__ = ["SweepOutcome", "launch", "prepare_experts"]
