"""Reading a sweep back from MLflow: its status, its results table, one trial's set, the UI.

Every view shows the sweep as it now is: a trial key counts only with a run of the config
digest its last launch recorded (`TRIALS_ARTIFACT` on the parent run), so the results of a
config that was changed and relaunched never mix into the table. The launch summary reads
through the same `summarize`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run

from mim4dd.metrics import TEST_ACC_MEAN
from orchestrator import aggregate, cross_arch, retrying, tracking, ui_view
from orchestrator.expand import Trial
from orchestrator.locks import running_launch

# What `status` shows for a sweep the embedded store says is RUNNING while no launch of it runs,
# and for its RUNNING trials: killed, or stopped where it could not write its end (a full disk)
INTERRUPTED = "INTERRUPTED"
TRIALS_ARTIFACT = "trials.json"  # on the parent run: {trial key: config digest} of the spec


def record_trials(client: Any, parent_run_id: str, trials: list[Trial]) -> None:
    """Remember on the parent run which config each trial key now stands for."""
    client.log_dict(parent_run_id, {t.key: t.digest for t in trials}, TRIALS_ARTIFACT)


def current_digests(client: Any, parent: Any) -> dict[str, str] | None:
    """{trial key: config digest} of the sweep's last launch; None for a sweep launched before
    digests were recorded (then every run counts)."""
    import mlflow.artifacts

    try:
        with tempfile.TemporaryDirectory() as folder:
            path = mlflow.artifacts.download_artifacts(
                run_id=parent.info.run_id, artifact_path=TRIALS_ARTIFACT, dst_path=folder,
                tracking_uri=client.tracking_uri,
            )
            digests = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # no such artifact (MLflow raises its own error types for that)
        return None
    return digests if isinstance(digests, dict) else None


def finished_trial_runs(client: Any, parent: Any) -> dict[str, Run]:
    """The sweep's finished trial runs of its current configs, by trial key: what `report`
    counts."""
    runs = tracking.child_runs(client, parent)
    return tracking.runs_by_key(runs, current_digests(client, parent), "FINISHED")


def summarize(
    runs: Iterable[Run], digests: Mapping[str, str] | None
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(trial frame, per-cell summary) of a sweep's finished trial runs of the current
    configs."""
    finished = tracking.runs_by_key(runs, digests, "FINISHED")
    if not finished:
        return None
    frame, axes = aggregate.trial_frame(finished.values())
    return frame, aggregate.summarize(frame, axes)


@dataclass
class SweepStatus:
    name: str
    run_status: str
    total: int
    trials: list[dict[str, Any]]  # key, status, iteration, iterations, test_acc_pct, failure

    def count(self, *statuses: str) -> int:
        return sum(1 for t in self.trials if t["status"] in statuses)

    @property
    def pending(self) -> int:
        return max(0, self.total - len(self.trials))

    def counts(self) -> str:
        """The trials in one line, as `status` prints it."""
        n = self.count
        return (f"{n('FINISHED')}/{self.total} done, {n('RUNNING')} running, "
                f"{n('KILLED', INTERRUPTED)} interrupted, {n('FAILED')} failed, "
                f"{self.pending} not started")


@contextmanager
def _reaching(uri: str) -> Iterator[None]:
    """An unreachable tracking server as one LookupError line (after MLflow's own retries,
    `retrying.impatient_http` for read commands), not pages of urllib3 tracebacks."""
    try:
        yield
    except Exception as exc:
        if not retrying.unreachable(exc):
            raise
        raise LookupError(retrying.unreachable_message(uri)) from None


def open_sweep(name: str, tracking_uri: str | None) -> tuple[Any, Any]:
    """(client, parent run) of a sweep in the store; LookupError when there is none or the
    store's server cannot be reached."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if not tracking.store_exists(uri):  # looking must not create an empty store
        raise LookupError(f"no sweep named {name!r}: there is no tracking store at {uri}")
    client = tracking.connect(uri)
    with _reaching(uri):
        parent = tracking.find_sweep_run(client, name)
    if parent is None:
        raise LookupError(f"no sweep named {name!r} in {uri}")
    return client, parent


def list_sweeps(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per sweep in the store, newest first: its parent run's status and counts as of
    its last launch."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if not tracking.store_exists(uri):
        return []
    rows = []
    with _reaching(uri):
        runs = tracking.sweep_runs(tracking.connect(uri))
    for run in runs:
        tags = run.data.tags
        finished, total = (tags.get(t, "?") for t in (tracking.TAG_FINISHED, tracking.TAG_TOTAL))
        started = time.localtime(run.info.start_time / 1000)
        name = tags.get(tracking.TAG_SWEEP, run.info.run_name)
        rows.append({
            "sweep": name,
            "status": _shown_status(run.info.status, name, uri),
            "finished": f"{finished}/{total}",
            "failed": tags.get(tracking.TAG_FAILED, "?"),
            "started": time.strftime("%Y-%m-%d %H:%M", started),
        })
    return rows


def sweep_status(name: str, tracking_uri: str | None = None) -> SweepStatus:
    client, parent = open_sweep(name, tracking_uri)
    runs = tracking.child_runs(client, parent)
    latest = tracking.runs_by_key(runs, current_digests(client, parent), status=None)
    trials = []
    for key, run in sorted(latest.items()):
        metrics, params = run.data.metrics, run.data.params
        trials.append({
            "key": key, "status": run.info.status,
            "iteration": int(run.data.tags.get(tracking.TAG_ITERATION, 0)),
            "iterations": int(tracking.parse_value(params.get("iterations", "0")) or 0),
            "test_acc_pct": metrics.get(TEST_ACC_MEAN),
            "failure": run.data.tags.get(tracking.TAG_FAILURE, ""),
        })
    total = int(parent.data.tags.get(tracking.TAG_TOTAL, len(trials)))
    run_status = _shown_status(parent.info.status, name, tracking_uri)
    if run_status == INTERRUPTED:  # so are the trials it shows running
        for trial in trials:
            trial["status"] = INTERRUPTED if trial["status"] == "RUNNING" else trial["status"]
    return SweepStatus(name, run_status, total, trials)


def _shown_status(status: str, name: str, tracking_uri: str | None) -> str:
    """A sweep's stored status, but INTERRUPTED where the embedded store says RUNNING and no
    launch of it runs (killed, or it could not write its end): its lock is in this home. A
    server's sweep may run anywhere, so it is shown as stored."""
    if status != "RUNNING" or not tracking.is_embedded(tracking.resolve_tracking_uri(tracking_uri)):
        return status
    try:
        return status if running_launch(name, tracking.home()) else INTERRUPTED
    except OSError:  # a home this user cannot write: cannot tell
        return status


@dataclass
class SweepReport:
    summary: pd.DataFrame  # per cell, finished trials of the current configs
    superseded: list[str]  # trial keys with finished results of an older config, not shown
    # per cell, every architecture's numbers (`cross_arch`); empty for a ConvNet-only sweep
    architectures: pd.DataFrame = field(default_factory=pd.DataFrame)

    def as_text(self, fmt: str) -> str:
        """The summary, with the architectures' columns, as "csv" or "json" (records, full
        precision) for programs."""
        table = cross_arch.merged(aggregate.exported(self.summary), self.architectures)
        if fmt == "csv":
            return table.to_csv(index=False)
        text = table.to_json(orient="records", indent=2, double_precision=15)
        # pandas writes every "/" as "\/": valid JSON, but "resnet18\/n_seeds" reads badly.
        # Safe to undo: a backslash of the data is written as two, which this never splits.
        return text.replace("\\/", "/") + "\n"


def sweep_report(name: str, tracking_uri: str | None = None) -> SweepReport:
    """The aggregated table of a sweep's finished trials of the current configs."""
    client, parent = open_sweep(name, tracking_uri)
    digests = current_digests(client, parent)
    runs = tracking.child_runs(client, parent)
    found = summarize(runs, digests)
    summary = found[1] if found else aggregate.summarize(*aggregate.trial_frame([]))
    architectures = (cross_arch.summarize(found[0], aggregate.cell_axes(summary)) if found
                     else pd.DataFrame())
    current = set(tracking.runs_by_key(runs, digests, "FINISHED"))
    older = set(tracking.latest_per_key(runs, "FINISHED")) - current
    return SweepReport(summary, sorted(older), architectures)


def pull(run_id: str, out_dir: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """Download a trial's synthetic set into `out_dir`, verified; returns `out_dir`.

    The files land in a staging folder first and only move into `out_dir` once
    `SyntheticSet.load` (which checks the tensors' sha256 against the manifest and never
    unpickles) accepted them.
    """
    import mlflow.artifacts

    from mim4dd.synset import SyntheticSet

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pull-") as staging:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=tracking.SYNSET_PATH, dst_path=staging, tracking_uri=uri
        )
        SyntheticSet.load(local)
        out.mkdir(exist_ok=True)
        for item in Path(local).iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    SyntheticSet.load(out)
    return out


def parse_where(items: list[str]) -> dict[str, Any]:
    """`pull --where PATH=VALUE` items as {path: value} (values read as logged params are)."""
    values = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--where takes PATH=VALUE, got {item!r}")
        values[path.strip()] = tracking.parse_value(text.strip())
    return values


def pull_set(
    target: str, out_dir: str | os.PathLike, tracking_uri: str | None = None,
    values: dict[str, Any] | None = None, force: bool = False,
) -> tuple[Path, str]:
    """Pull by run id, or by sweep name plus setting values; returns (folder, run id).
    A folder holding anything is only written into with `force`."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    if not force and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty; pass --force to write the set into it")
    values = {k: v for k, v in (values or {}).items() if v is not None}
    if not values and re.fullmatch(r"[0-9a-f]{32}", target):
        return pull(target, out_dir, tracking_uri), target
    client, parent = open_sweep(target, tracking_uri)
    runs = tracking.of_digests(tracking.child_runs(client, parent),
                               current_digests(client, parent))
    run = find_trial_run(runs, values=values)
    return pull(run.info.run_id, out_dir, tracking_uri), run.info.run_id


def ui_command(tracking_uri: str | None, host: str, port: int, workers: int = 1) -> list[str]:
    """The `mlflow ui` command line for a store (embedded: its sqlite db and artifacts). One
    worker by default: MLflow's four took ~2.5 GB for a handful of runs."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if root := tracking.artifact_root(uri):
        command += ["--default-artifact-root", root]
    return command


def sweep_link(name: str, base_url: str, tracking_uri: str | None = None) -> str:
    """The URL of a sweep's runs table in the MLflow UI at `base_url` (`ui_view`)."""
    client, parent = open_sweep(name, tracking_uri)
    return ui_view.link(base_url, client.get_experiment(parent.info.experiment_id), name)


def _same(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(actual) == float(wanted)
        except (TypeError, ValueError):
            return False
    return str(actual).lower() == str(wanted).lower()


def find_trial_run(
    runs: Iterable[Run], key: str | None = None, values: Mapping[str, Any] | None = None,
    status: str | None = "FINISHED",
) -> Run:
    """The one trial run matching a trial key and/or setting values; LookupError otherwise."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    candidates = tracking.latest_per_key(runs, status)
    matches = [
        run for k, run in candidates.items()
        if (key is None or k == key)
        and all(_same(tracking.trial_values(run).get(path), v) for path, v in values.items())
    ]
    what = ", ".join([*([f"key {key}"] if key else []), *(f"{k}={v}" for k, v in values.items())])
    if not matches:
        known = "; ".join(sorted(candidates)) or "none"
        raise LookupError(f"no {status or ''} trial run matches {what or 'anything'} "
                          f"(trials: {known})")
    if len(matches) > 1:
        keys = "; ".join(sorted(r.data.tags[tracking.TAG_KEY] for r in matches))
        raise LookupError(f"{len(matches)} trial runs match {what}: {keys}; narrow it down")
    return matches[0]


__all__ = ["SweepReport", "SweepStatus", "TRIALS_ARTIFACT", "current_digests", "find_trial_run",
           "finished_trial_runs", "list_sweeps", "open_sweep", "parse_where", "pull", "pull_set",
           "record_trials", "summarize", "sweep_report", "sweep_link", "sweep_status",
           "ui_command"]
