"""MLflow bookkeeping for sweeps: where the store lives, finding runs, the sweep's parent run.

A trial's own run is written by `orchestrator.trial_run`; a set is pulled back by
`orchestrator.queries.pull`.

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
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag, ViewType

from orchestrator.lineage import versions
from orchestrator.locks import held
from orchestrator.retrying import RetryingClient, probe_database, refuse_unreadable

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
# The last distillation step MLflow holds, sent in the same request as that step's metrics:
# a resumed trial logs only later steps, and `status` shows progress from it.
TAG_ITERATION = "mim4dd.iteration"
# On a parent: params of an earlier launch that no longer match the sweep file (MLflow never
# changes a logged param; the current grid is in its spec.json and sweep.yaml).
TAG_STALE_PARAMS = "mim4dd.stale_params"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
# MLflow 3's UI opens an experiment without this tag on its GenAI (tracing) page; with it, on
# the runs table (the value its UI bundle names CUSTOM_MODEL_DEVELOPMENT).
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TAG_EXPERTS = "mim4dd.experts"  # key digest of the expert buffer a run records
TAG_BUFFERS = "mim4dd.expert_buffers"  # on a parent: digests of the buffers its trials read
TAG_TOTAL, TAG_FINISHED, TAG_FAILED = (  # on a parent: trial counts of the last launch
    "mim4dd.trials_total", "mim4dd.trials_finished", "mim4dd.trials_failed"
)
# On a parent: how many launches it has seen; each launch logs its metrics at this step, so a
# relaunch adds a step instead of a second value at the same one.
TAG_LAUNCH = "mim4dd.launch"

SYNSET_PATH = "synset"  # artifact folder holding the synthetic set

_MAX_TAG = 5000  # MLflow's limit per tag value


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
    """A client of the store at `uri` whose calls ride out transient store errors; a store that
    cannot be used is one StoreError line (`retrying`: probe_database, refuse_unreadable)."""
    # MLflow logs each database error with its traceback before raising it; the exception reaches
    # the caller anyway (RetryingClient retries it, or it stands), so the log is only noise.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    path = _sqlite_path(uri)
    if uri.startswith(("postgresql", "postgres:")):
        probe_database(uri)
    if path is None:
        return RetryingClient(MlflowClient(tracking_uri=uri))
    # MLflow creates and migrates a fresh sqlite store on first use; two processes doing it at
    # once break it, so that is serialised where this user may write (else: readers just read).
    writable = os.access(path.parent, os.W_OK) or not path.parent.exists()
    with held(path.with_name(path.name + ".lock")) if writable else nullcontext():
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as exc:
            refuse_unreadable(path, exc)
            raise
    return RetryingClient(client)


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created if needed, marked for MLflow 3's model-training view."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root(uri),
                                        tags={TAG_EXPERIMENT_KIND: TRAINING_KIND})
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if TAG_EXPERIMENT_KIND not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
    return experiment.experiment_id


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


def sweep_runs(client: MlflowClient) -> list[Run]:
    """The parent run of every sweep in the store, newest first."""
    ids = _experiment_ids(client)
    return search_all(client, ids, f"tags.`{TAG_ROLE}` = 'sweep'") if ids else []


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


def runs_by_key(
    runs: Iterable[Run], digests: Mapping[str, str] | None, status: str | None
) -> dict[str, Run]:
    """Newest run per trial key, keeping only runs whose config digest matches `digests`."""
    return latest_per_key(of_digests(runs, digests), status)


def of_digests(runs: Iterable[Run], digests: Mapping[str, str] | None) -> list[Run]:
    """The runs whose config digest is the one `digests` gives their trial key (all: None)."""
    if digests is None:
        return list(runs)
    return [r for r in runs if digests.get(r.data.tags.get(TAG_KEY, "")) ==
            r.data.tags.get(TAG_DIGEST)]


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


# --- the parent run --------------------------------------------------------------------------


def open_sweep_run(
    client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, Any],
    params: Mapping[str, str] | None = None,
) -> Run:
    """Find the sweep's parent run (a relaunch continues it) or create it; leave it RUNNING,
    with `tags` and the `params` it lacks (changed ones are named in TAG_STALE_PARAMS)."""
    run = find_sweep_run(client, name, experiment_id)
    if run is None:
        run = client.create_run(experiment_id, run_name=name,
                                tags={TAG_SWEEP: name, TAG_ROLE: "sweep"})
    else:
        client.update_run(run.info.run_id, status="RUNNING")
        clear_failure(client, run)
    held = run.data.params
    tags = {**versions(), **tags, TAG_LAUNCH: int(run.data.tags.get(TAG_LAUNCH, 0)) + 1}
    if stale := sorted(k for k, v in (params or {}).items() if k in held and held[k] != v):
        tags[TAG_STALE_PARAMS] = ", ".join(stale)
    set_tags(client, run.info.run_id, tags)
    new = [Param(k, v) for k, v in (params or {}).items() if k not in held]
    for start in range(0, len(new), 100):  # MLflow takes 100 params per request
        client.log_batch(run.info.run_id, params=new[start : start + 100])
    return client.get_run(run.info.run_id)


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED, recording why when it did not finish."""
    if reason:
        client.set_tag(run_id, TAG_FAILURE, reason[:_MAX_TAG])
    client.set_terminated(run_id, status)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()])


def log_table(client: MlflowClient, run_id: str, table: Any, artifact_file: str) -> None:
    """`client.log_table` (the UI shows it as a table), replacing a table logged before:
    MLflow itself appends the new rows to the old ones."""
    folder = posixpath.dirname(artifact_file)
    if artifact_file not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        client.log_table(run_id, table, artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / posixpath.basename(artifact_file)
        table.to_json(path, orient="split", index=False)  # log_table's own format
        client.log_artifact(run_id, str(path), folder or None)


def clear_failure(client: MlflowClient, run: Run) -> None:
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


__all__ = [
    "HOME_ENV",
    "SYNSET_PATH",
    "child_runs",
    "connect",
    "end_run",
    "ensure_experiment",
    "find_sweep_run",
    "home",
    "log_expert_buffer",
    "log_table",
    "open_sweep_run",
    "resolve_tracking_uri",
    "set_tags",
    "trial_values",
]
