"""MLflow bookkeeping for sweeps: where the store lives, parent/child runs, metrics, artifacts.

One parent run per sweep (found again by its `mim4dd.sweep` tag, so a relaunch continues it),
one nested child run per trial (found again by `mim4dd.trial_key` + `mim4dd.config_digest`, so
a retried or resumed trial continues its run instead of starting a second one). Every run ends
FINISHED, FAILED (the reason in `mim4dd.failure`) or, when Tune stops it (Ctrl-C), KILLED;
only a killed process leaves one RUNNING. The next launch continues any run not FINISHED.

The store is either embedded (`sqlite:///<home>/mlflow.db`, artifacts in `<home>/artifacts`,
home = `$MIM4DD_HOME` or `./.mim4dd`) or any tracking URI, e.g. an `mlflow server` with proxied
artifacts (`--serve-artifacts`), which is what remote Ray workers need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag, ViewType

HOME_ENV = "MIM4DD_HOME"
DEFAULT_HOME = ".mim4dd"

TAG_SWEEP = "mim4dd.sweep"
TAG_ROLE = "mim4dd.role"  # "sweep" on the parent, "trial" on children
TAG_KEY = "mim4dd.trial_key"
TAG_DIGEST = "mim4dd.config_digest"
TAG_OVERRIDES = "mim4dd.overrides"  # JSON {dotted path: value} of the trial's grid point
TAG_FAILURE = "mim4dd.failure"
TAG_RESUMED = "mim4dd.resumed_from_iteration"
TAG_ATTEMPT = "mim4dd.attempt"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
TAG_EXPERTS = "mim4dd.experts"  # key digest of the expert buffer a run records

SYNSET_PATH = "synset"  # artifact folder holding the synthetic set
RESULTS_FILE = "results.json"

# MLflow's limits per log_batch call and per tag value.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAG = 1000, 100, 5000


# --- where the store is ----------------------------------------------------------------------


def home() -> Path:
    """The project-local folder holding the embedded store and Ray's results."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else the embedded sqlite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def is_embedded(uri: str) -> bool:
    return _sqlite_path(uri) is not None


def store_exists(uri: str) -> bool:
    """False for an embedded store never written to (reading must not create one)."""
    path = _sqlite_path(uri)
    return path is None or path.is_file()


def artifact_root(uri: str) -> str | None:
    """Artifacts of an embedded store live beside its database; a server decides its own."""
    path = _sqlite_path(uri)
    return (path.parent / "artifacts").as_uri() if path else None


def connect(uri: str) -> MlflowClient:
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def versions() -> dict[str, str]:
    found = {}
    for package in ("mim4dd", "torch", "ray", "mlflow"):
        try:
            found[f"mim4dd.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[f"mim4dd.version.{package}"] = "unknown"
    return found


# --- searching -------------------------------------------------------------------------------


def _quoted(value: str) -> str:
    # MLflow's filter grammar has no escape for quotes; spec names cannot contain them.
    if "'" in value:
        raise ValueError(f"cannot search for a value containing a quote: {value!r}")
    return f"'{value}'"


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, ViewType.ACTIVE_ONLY, max_results=1000,
            order_by=["attributes.start_time DESC"], page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client: MlflowClient) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def find_sweep_run(
    client: MlflowClient, name: str, experiment_id: str | None = None
) -> Run | None:
    """The parent run of sweep `name` (in any experiment unless one is given), newest first."""
    ids = [experiment_id] if experiment_id else _experiment_ids(client)
    if not ids:
        return None
    runs = search_all(
        client, ids, f"tags.`{TAG_SWEEP}` = {_quoted(name)} and tags.`{TAG_ROLE}` = 'sweep'"
    )
    return runs[0] if runs else None


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """Every trial run under a sweep's parent run, newest first."""
    return search_all(
        client, [parent.info.experiment_id],
        f"tags.`{TAG_PARENT}` = {_quoted(parent.info.run_id)} and tags.`{TAG_ROLE}` = 'trial'",
    )


def latest_per_key(runs: Iterable[Run], status: str | None = "FINISHED") -> dict[str, Run]:
    """One run per trial key (the newest), optionally only runs with `status`."""
    chosen: dict[str, Run] = {}
    for run in runs:
        key = run.data.tags.get(TAG_KEY)
        if key is None or (status and run.info.status != status):
            continue
        if key not in chosen or (run.info.start_time or 0) > (chosen[key].info.start_time or 0):
            chosen[key] = run
    return chosen


def finished_trial_keys(
    client: MlflowClient, parent: Run, digests: Mapping[str, str] | None = None
) -> set[str]:
    """Trial keys with a FINISHED child run; with `digests`, only where the config matches."""
    return set(runs_by_key(child_runs(client, parent), digests, status="FINISHED"))


def runs_by_key(
    runs: Iterable[Run], digests: Mapping[str, str] | None, status: str | None
) -> dict[str, Run]:
    """Newest run per trial key, keeping only runs whose config digest matches `digests`."""
    if digests is not None:
        runs = [r for r in runs if digests.get(r.data.tags.get(TAG_KEY, "")) ==
                r.data.tags.get(TAG_DIGEST)]
    return latest_per_key(runs, status)


def parse_value(text: str) -> Any:
    """A logged parameter back to a value: '0.8' -> 0.8, 'true' -> True, 'digits' -> 'digits'."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def trial_values(run: Run) -> dict[str, Any]:
    """The dotted-path settings of a trial run: its full config, with the grid point on top."""
    values = {k: parse_value(v) for k, v in run.data.params.items()}
    values.update(json.loads(run.data.tags.get(TAG_OVERRIDES, "{}")))
    return values


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
    candidates = latest_per_key(runs, status)
    matches = [
        run for k, run in candidates.items()
        if (key is None or k == key)
        and all(_same(trial_values(run).get(path), v) for path, v in values.items())
    ]
    what = ", ".join([*([f"key {key}"] if key else []), *(f"{k}={v}" for k, v in values.items())])
    if not matches:
        known = "; ".join(sorted(candidates)) or "none"
        raise LookupError(f"no {status or ''} trial run matches {what or 'anything'} "
                          f"(trials: {known})")
    if len(matches) > 1:
        keys = "; ".join(sorted(r.data.tags[TAG_KEY] for r in matches))
        raise LookupError(f"{len(matches)} trial runs match {what}: {keys}; narrow it down")
    return matches[0]


# --- the parent run --------------------------------------------------------------------------


def open_sweep_run(
    client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, Any]
) -> Run:
    """Find the sweep's parent run (a relaunch continues it) or create it; leave it RUNNING."""
    run = find_sweep_run(client, name, experiment_id)
    if run is None:
        run = client.create_run(
            experiment_id, run_name=name,
            tags={TAG_SWEEP: name, TAG_ROLE: "sweep", **versions(),
                  **{k: str(v) for k, v in tags.items()}},  # the REST API takes text only
        )
    else:
        client.update_run(run.info.run_id, status="RUNNING")
        set_tags(client, run.info.run_id, tags)
        _clear_failure(client, run)
    return client.get_run(run.info.run_id)


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED, recording why when it did not finish."""
    if reason:
        client.set_tag(run_id, TAG_FAILURE, reason[:_MAX_TAG])
    client.set_terminated(run_id, status)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()])


def _clear_failure(client: MlflowClient, run: Run) -> None:
    if TAG_FAILURE in run.data.tags:
        client.delete_tag(run.info.run_id, TAG_FAILURE)


def log_expert_buffer(
    client: MlflowClient, experiment_id: str, digest: str, directory: str, manifest: str,
    sweep: str,
) -> str:
    """A small FINISHED run recording a sealed expert buffer: where it is and its manifest.

    The trajectories themselves stay on the shared path (gigabytes per buffer)."""
    data = json.loads(manifest)
    checkpoints, num_params = data["shape"]
    run = client.create_run(experiment_id, run_name=f"experts-{digest}", tags={
        TAG_EXPERTS: digest, TAG_ROLE: "experts", TAG_SWEEP: sweep,
        "mim4dd.expert_dir": directory, **versions(),
    })
    run_id = run.info.run_id
    params = {"dataset": data["key"]["dataset"], "count": data["count"],
              "expert_train_epochs": checkpoints - 1, "num_params": num_params}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.json"
        path.write_text(manifest, encoding="utf-8")
        client.log_artifact(run_id, str(path))
    end_run(client, run_id, "FINISHED")
    return run_id


# --- one trial's run -------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"eval": {"epochs": 5}} -> {"eval.epochs": "5"}; values as JSON, strings as-is."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TrialRun:
    """The child run of one trial, as the trial process writes to it.

    Metrics are buffered and sent with `log_batch` on `flush` (the trainable flushes at each
    checkpoint), so logging costs one request per checkpoint interval, not one per iteration.
    A trial resumed from a checkpoint older than its last logged step skips the steps MLflow
    already holds, so every step is logged once.
    """

    def __init__(self, client: MlflowClient, run: Run):
        self.client = client
        self.run_id = run.info.run_id
        self.run = run
        self._buffer: list[Metric] = []
        # Steps up to here are in MLflow already: a trial resumed from an older checkpoint
        # recomputes them (identically on CPU) but must not log them twice.
        self.logged_until = int(run.data.metrics.get("iteration", 0))

    @classmethod
    def open(
        cls, client: MlflowClient, parent_run_id: str, sweep: str, key: str,
        overrides: Mapping[str, Any], config: Mapping[str, Any], digest: str,
        run_id: str | None = None,
    ) -> TrialRun:
        """Continue the trial's run (by id from a checkpoint, else by key) or create it.

        A FINISHED run is returned untouched (`finished` is True): the caller skips the work.
        """
        parent = client.get_run(parent_run_id)
        run = _existing(client, run_id)
        if run is None:
            same = runs_by_key(child_runs(client, parent), {key: digest}, status=None)
            run = same.get(key)
        if run is None:
            run = client.create_run(
                parent.info.experiment_id, run_name=key,
                tags={
                    TAG_PARENT: parent_run_id, TAG_SWEEP: sweep, TAG_ROLE: "trial",
                    TAG_KEY: key, TAG_DIGEST: digest,
                    TAG_OVERRIDES: json.dumps(dict(overrides), sort_keys=True), **versions(),
                },
            )
        trial = cls(client, run)
        if run.info.status == "FINISHED":
            return trial
        if not run.data.params:  # a run created by a process killed before it logged them
            params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
            for start in range(0, len(params), _MAX_PARAMS):
                client.log_batch(run.info.run_id, params=params[start : start + _MAX_PARAMS])
        attempt = int(run.data.tags.get(TAG_ATTEMPT, "0")) + 1
        client.update_run(run.info.run_id, status="RUNNING")
        client.set_tag(run.info.run_id, TAG_ATTEMPT, str(attempt))
        _clear_failure(client, run)
        return trial

    @property
    def finished(self) -> bool:
        return self.run.info.status == "FINISHED"

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_iteration(self, step: int, metrics: Mapping[str, float]) -> None:
        """One optimisation step's metrics, unless this step was logged before a restart."""
        if step > self.logged_until:
            self.log_metrics(step, {"iteration": step, **metrics})

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= _MAX_METRICS:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer[:_MAX_METRICS], self._buffer[_MAX_METRICS:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_evaluation(self, evaluation: Any, step: int) -> dict[str, float]:
        """Per-network and summary accuracies of an EvalResult; returns what was logged."""
        metrics = {f"eval/test_acc_net{i}": a for i, a in enumerate(evaluation.test_accuracies)}
        metrics |= {f"eval/val_acc_net{i}": a for i, a in enumerate(evaluation.val_accuracies)}
        metrics |= {"eval/test_acc_mean": evaluation.mean, "eval/test_acc_std": evaluation.std}
        if evaluation.val_accuracies:
            metrics["eval/val_acc_mean"] = evaluation.val_mean
        self.log_metrics(step, metrics)
        self.flush()
        return metrics

    def log_outputs(self, synset_dir: Path, results_file: Path) -> None:
        self.client.log_artifacts(self.run_id, str(synset_dir), SYNSET_PATH)
        self.client.log_artifact(self.run_id, str(results_file))

    def finish(self) -> None:
        self.flush()
        end_run(self.client, self.run_id, "FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """End FAILED with the reason, keeping the curve up to the failure."""
        try:
            self.flush()
        finally:
            end_run(self.client, self.run_id, status, reason)

    def stop(self, reason: str) -> None:
        """Interrupted, not broken: KILLED; the next launch continues this run."""
        self.fail(reason, status="KILLED")


def _existing(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # gone, or from another store: fall back to the key
        return None
    return run if run.info.lifecycle_stage == "active" else None


# --- pulling a set back ----------------------------------------------------------------------


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
    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pull-") as staging:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=SYNSET_PATH, dst_path=staging, tracking_uri=uri
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


__all__ = [
    "HOME_ENV",
    "SYNSET_PATH",
    "TrialRun",
    "child_runs",
    "connect",
    "end_run",
    "ensure_experiment",
    "find_sweep_run",
    "find_trial_run",
    "finished_trial_keys",
    "flatten",
    "home",
    "log_expert_buffer",
    "open_sweep_run",
    "pull",
    "resolve_tracking_uri",
    "trial_values",
]
