"""The child run of one trial, as the trial process writes it: a description, params, batched
metrics, the data it read, system metrics, the evaluation, the set (with a preview image) and
its results file, and how the run ends.

A retried or resumed trial continues its run (by id from its Tune checkpoint, else by trial
key and config digest), so no trial ever gets a second child run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from mim4dd.evaluate import EvalResult
from mim4dd.synset import GRID_FILE, GRID_PADDING, MANIFEST_FILE
from orchestrator import lineage
from orchestrator.expand import Trial
from orchestrator.tracking import (
    SYNSET_PATH, TAG_ATTEMPT, TAG_DIGEST, TAG_ITERATION, TAG_KEY, TAG_NOTE, TAG_OVERRIDES,
    TAG_PARENT, TAG_ROLE, TAG_SWEEP, child_runs, clear_failure, end_run, runs_by_key, set_tags,
)

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from mim4dd.data import RealData

ERROR_FILE = "error.txt"  # a failed trial's traceback, in its run's artifacts
PREVIEW_KEY = "synthetic_set"  # the set's grid.png as an MLflow image: the UI shows it
_PREVIEW_PX = 256  # a smaller grid is enlarged to about this on its short side
# MLflow's limits per log_batch call (1000 entries; one is the progress tag).
_MAX_METRICS, _MAX_PARAMS = 999, 100
# System metrics (CPU, memory, disk, network; GPU with pynvml) every this many seconds: one
# small request each, against thousands of optimisation steps a minute.
SYSTEM_METRICS_EVERY_S = 10
# `log_inputs` calls before a refusal stands: each collision means another trial's dataset rows
# were committed, and a trial logs at most three (train, validation, test).
_INPUT_ATTEMPTS = 4


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


STEP_METRIC = "loss"  # logged at every optimisation step of every base


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
        self.logged_until = int(run.data.tags.get(TAG_ITERATION, 0))
        # Names of the run's metrics: a once-per-trial metric (`log_once`) the run holds from
        # an earlier attempt is not logged again.
        self.logged_names = set(run.data.metrics)
        self._monitor: Any = None  # MLflow's system-metrics thread while the run is ours

    @classmethod
    def open(
        cls, client: MlflowClient, parent_run_id: str, sweep: str, trial: Trial,
        run_id: str | None = None, tags: Mapping[str, str] | None = None,
    ) -> TrialRun:
        """Continue the trial's run (by id from a checkpoint, else by key and digest) or
        create it with `tags` (e.g. `lineage.source_tags`). A FINISHED run is returned
        untouched (`finished` is True): the caller skips the work.
        """
        parent = client.get_run(parent_run_id)
        run = _existing(client, run_id)
        if run is None:
            same = runs_by_key(child_runs(client, parent), {trial.key: trial.digest}, status=None)
            run = same.get(trial.key)
        if run is None:
            run = client.create_run(
                parent.info.experiment_id, run_name=trial.key,
                tags={
                    TAG_PARENT: parent_run_id, TAG_SWEEP: sweep, TAG_ROLE: "trial",
                    TAG_KEY: trial.key, TAG_DIGEST: trial.digest,
                    TAG_OVERRIDES: json.dumps(trial.overrides, sort_keys=True),
                    TAG_NOTE: lineage.describe_trial(sweep, trial), **lineage.versions(),
                    **(tags or {}),
                },
            )
        opened = cls(client, run)
        if run.info.status == "FINISHED":
            return opened
        if not run.data.params:  # a run created by a process killed before it logged them
            params = [Param(k, v[:6000]) for k, v in flatten(trial.values()).items()]
            for start in range(0, len(params), _MAX_PARAMS):
                client.log_batch(run.info.run_id, params=params[start : start + _MAX_PARAMS])
        if STEP_METRIC in run.data.metrics:  # resumed: its metrics may be ahead of the tag
            # (the store writes a batch's metrics, then its tags; a kill in between leaves the
            # tag behind), and the steps it holds must not come again
            history = client.get_metric_history(run.info.run_id, STEP_METRIC)
            opened.logged_until = max([opened.logged_until, *(m.step for m in history)])
        attempt = int(run.data.tags.get(TAG_ATTEMPT, "0")) + 1
        client.update_run(run.info.run_id, status="RUNNING")
        client.set_tag(run.info.run_id, TAG_ATTEMPT, str(attempt))
        clear_failure(client, run)
        opened._monitor = _system_metrics(client, run.info.run_id)
        return opened

    @property
    def finished(self) -> bool:
        return self.run.info.status == "FINISHED"

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_iteration(self, step: int, metrics: Mapping[str, float]) -> None:
        """One optimisation step's metrics, unless this step was logged before a restart."""
        if step > self.logged_until:
            self.log_metrics(step, metrics)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= _MAX_METRICS:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer[:_MAX_METRICS], self._buffer[_MAX_METRICS:]
            newest = max(m.step for m in batch)
            tags = [RunTag(TAG_ITERATION, str(newest))] if newest > self.logged_until else []
            self.client.log_batch(self.run_id, metrics=batch, tags=tags)
            self.logged_until = max(self.logged_until, newest)

    def log_inputs(self, data: RealData) -> None:
        """The dataset splits the trial reads, each with a digest (MLflow's Dataset column).

        Safe when many trials log the same dataset at once. MLflow keeps one dataset row per
        (experiment, name, digest), read-then-insert in one transaction: of two trials inserting
        it together, PostgreSQL (or sqlite) refuses the second, and that transaction writes
        nothing. Logging again is idempotent (the row now exists and is reused; an input the
        run holds is not added twice), so a refused call is repeated; a call that fails while
        the run already holds every input was a collision with itself, and is success.
        """
        inputs = lineage.dataset_inputs(data)
        for attempt in range(1, _INPUT_ATTEMPTS + 1):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException:
                if self._holds(inputs):
                    return
                if attempt == _INPUT_ATTEMPTS:
                    raise

    def _holds(self, inputs: list[DatasetInput]) -> bool:
        held = {(i.dataset.name, i.dataset.digest)
                for i in self.client.get_run(self.run_id).inputs.dataset_inputs}
        return {(i.dataset.name, i.dataset.digest) for i in inputs} <= held

    def log_once(self, metrics: Mapping[str, float]) -> None:
        """Metrics a trial has one value of (its evaluation, its peak memory), at step 0 and
        sent now; those the run already holds (logged before a restart) are left out.

        Step 0: MLflow then charts them as one bar per run, so runs compare side by side
        instead of as single dots at each run's last step."""
        new = {k: v for k, v in metrics.items() if k not in self.logged_names}
        self.log_metrics(0, new)
        self.flush()
        self.logged_names |= set(new)

    def log_evaluation(self, evaluation: EvalResult) -> dict[str, float]:
        """Per-network and summary accuracies (%) of an evaluation (`log_once`: the networks
        logged while it ran are not logged again); returns all of them."""
        metrics = evaluation.metrics()
        self.log_once(metrics)
        return metrics

    def log_outputs(self, synset_dir: Path, results_file: Path) -> None:
        """The set and its results file as artifacts, and its grid as an image the UI shows."""
        from PIL import Image

        self.client.log_artifacts(self.run_id, str(synset_dir), SYNSET_PATH)
        self.client.log_artifact(self.run_id, str(results_file))
        if (synset_dir / GRID_FILE).is_file():
            manifest = json.loads((synset_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
            with Image.open(synset_dir / GRID_FILE) as grid:
                preview = squarer(grid.convert("RGB"), manifest["num_classes"])
            # Pixels enlarged, not smoothed: a grid of 8x8 digits is 22 px wide.
            scale = max(1, min(16, _PREVIEW_PX // min(preview.size)))
            preview = preview.resize((preview.width * scale, preview.height * scale),
                                     Image.Resampling.NEAREST)
            self.client.log_image(self.run_id, preview, key=PREVIEW_KEY, step=0)

    def finish(self) -> None:
        self._end("FINISHED")

    def _end(self, status: str, reason: str | None = None, details: str | None = None) -> None:
        try:
            if self._monitor is not None:  # its last samples land before the run ends
                self._monitor.finish()
                self._monitor = None
            self.flush()
            if details:
                self.client.log_text(self.run_id, details, ERROR_FILE)
        finally:
            end_run(self.client, self.run_id, status, reason)

    def fail(self, reason: str, details: str | None = None) -> None:
        """End FAILED with the reason, keeping the curve up to the failure; `details` (the
        traceback) goes to the run as `ERROR_FILE`, so a log needs only the one-line reason."""
        self._end("FAILED", reason, details)

    def stop(self, reason: str) -> None:
        """Interrupted, not broken: KILLED; the next launch continues this run."""
        self._end("KILLED", reason)


def _system_metrics(client: MlflowClient, run_id: str) -> Any:
    """MLflow's system-metrics monitor, started for `run_id`; None without psutil. Its thread
    stops when the run ends (`TrialRun._end`), or by itself once the run is no longer RUNNING.
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides the interval."""
    if importlib.util.find_spec("psutil") is None:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_EVERY_S,
                                   resume_logging=True, tracking_uri=client.tracking_uri)
    monitor.start()
    return monitor


def _existing(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # gone, or from another store: fall back to the key
        return None
    return run if run.info.lifecycle_stage == "active" else None


def squarer(grid: PILImage, rows: int) -> PILImage:
    """A set's grid (one row of images per class) with its rows laid side by side, as many per
    line as make the picture about square: MLflow shows an image in a fixed-size box, where a
    10-class IPC 1 grid (one column of 10 images) was a sliver."""
    from PIL import Image

    step = (grid.height - GRID_PADDING) // rows  # a row's height: padding above, then images
    per_line = max(1, round(math.sqrt(rows * step / grid.width)))
    if per_line == 1:
        return grid
    width = grid.width - GRID_PADDING  # rows side by side share their padding columns
    lines = math.ceil(rows / per_line)
    out = Image.new(grid.mode, (per_line * width + GRID_PADDING, lines * step + GRID_PADDING))
    for row in range(rows):
        line, slot = divmod(row, per_line)
        strip = grid.crop((0, row * step, grid.width, (row + 1) * step + GRID_PADDING))
        out.paste(strip, (slot * width, line * step))
    return out


__all__ = ["ERROR_FILE", "PREVIEW_KEY", "TrialRun", "flatten", "squarer"]
