"""MLflow calls that ride out a saturated or briefly unreachable tracking store.

Measured (`benchmarks/bench_tracking.py`, BENCHMARKS.md section 5): with 64 trials logging at
once, an `mlflow server` on PostgreSQL ran out of database connections and answered HTTP 400
("QueuePool limit ... connection timed out"), which MLflow's client does not retry: over half
the trials ended FAILED. Every MLflow call of the service therefore goes through
`RetryingClient`, which retries with exponential backoff and jitter:

* errors that prove the call never took effect (no connection to the database or the server,
  a locked sqlite file), for every call;
* errors that leave it unknown (a timeout, a dropped connection, a 5xx), only for calls that
  are safe to repeat: logging a batch again is a no-op (MLflow skips metric rows it holds, and
  ours carry fixed timestamps), tags and params are upserts, reads are reads. Creating a run is
  never repeated on them, so a retry cannot make a second child run.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import Any

DELAYS_S = (0.5, 1, 2, 4, 8, 16, 16, 16)  # about a minute in all, then the error stands
# The call never reached the database (or the server): repeating it is always safe.
NEVER_APPLIED = ("QueuePool limit", "database is locked", "Connection refused",
                 "Failed to establish a new connection", "_MLFLOW_TELEMETRY_SESSION_ID")
# The call may or may not have taken effect.
UNKNOWN_OUTCOME = ("Read timed out", "timed out", "RemoteDisconnected", "Connection aborted",
                   "Connection reset", "TEMPORARILY_UNAVAILABLE", "503", "502", "504")
REPEATABLE = frozenset({
    "log_batch", "log_metric", "log_param", "set_tag", "delete_tag", "set_terminated",
    "update_run", "log_artifact", "log_artifacts", "log_text", "log_dict", "get_run", "search_runs",
    "search_experiments", "get_experiment", "get_experiment_by_name", "get_metric_history",
    "list_artifacts", "download_artifacts", "restore_experiment",
})

retried: Counter[str] = Counter()  # method -> retries in this process (benchmarks read it)
_log = logging.getLogger(__name__)


def _retryable(method: str, exc: Exception) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    if any(sign in text for sign in NEVER_APPLIED):
        return True
    return method in REPEATABLE and any(sign in text for sign in UNKNOWN_OUTCOME)


class RetryingClient:
    """An `MlflowClient` whose calls retry transient store errors (see the module docstring);
    everything else passes through unchanged."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target) or name.startswith("_"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            for delay in (*DELAYS_S, None):
                try:
                    return target(*args, **kwargs)
                except Exception as exc:
                    if delay is None or not _retryable(name, exc):
                        raise
                    retried[name] += 1
                    _log.warning("MLflow %s failed (%s); retrying in about %ss", name,
                                 str(exc).splitlines()[0][:200], delay)
                    time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: no thundering herd
            raise AssertionError("unreachable")

        return call


__all__ = ["DELAYS_S", "RetryingClient", "retried"]
