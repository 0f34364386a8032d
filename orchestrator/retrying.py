"""MLflow calls that ride out a briefly unavailable tracking store, decided by cause.

Two layers, each retrying what it can tell is transient from the error's type and code, never
from its text (a run id or a path may contain "503" or "timed out"):

* Over HTTP, MLflow's own client retries what the transport reports: refused or reset
  connections, timeouts, and HTTP 429/500/502/503/504, with backoff. How long it keeps at it is
  `impatient_http`: a read command (`status`, `report`, `list`, `pull`) gives up within about
  ten seconds with one line; a launch and its trials wait minutes, as MLflow does by default.
* `RetryingClient` retries what a database store raises in this process (an embedded sqlite
  store, or a ``postgresql://`` tracking URI), found in the exception's chain:
  - never applied, so safe to repeat for every call: sqlite's busy or locked file, PostgreSQL's
    serialization failure or deadlock (rolled back), too many connections, a server that cannot
    take connections now, SQLAlchemy's exhausted connection pool;
  - unknown outcome (the connection broke mid-call), repeated only for calls whose repeat is
    harmless (`REPEATABLE`): logging a batch again is a no-op (MLflow skips metric rows it
    holds, and ours carry fixed timestamps), tags and params are upserts, reads are reads.
    Creating a run is never repeated on them, so a retry cannot make a second child run.

Anything else - a missing run, a bad request, a permission error - surfaces at once.
Measured under load: BENCHMARKS.md section 5 (the server recipe's pool, `orchestrator.server`,
keeps PostgreSQL's pool from running out behind the server, where it would come back as HTTP 400).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DELAYS_S = (0.5, 1, 2, 4, 8, 16, 16, 16)  # about a minute in all, then the error stands
SQLITE_BUSY, SQLITE_LOCKED = 5, 6  # result codes (an extended code holds them in its low byte)
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
SQLITE_READONLY, SQLITE_FULL = 8, 13
# OSError numbers of a write no retry cures: the user must free space or choose another folder
# (not EACCES: a launch also reads data, and "cannot write" would mislead there)
UNWRITABLE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                     errno.EROFS: "the file system is read-only"}
UNWRITABLE_SQLITE = {SQLITE_FULL: UNWRITABLE_ERRNOS[errno.ENOSPC],
                     SQLITE_READONLY: UNWRITABLE_ERRNOS[errno.EROFS]}
# PostgreSQL SQLSTATEs of a statement that did not take effect: serialization failure, deadlock
# (its transaction was rolled back), too many connections, cannot connect now, no connection.
NOT_APPLIED_SQLSTATES = frozenset({"40001", "40P01", "53300", "57P03", "08001", "08004"})
# ... and of a connection lost during the call: it may or may not have taken effect.
UNKNOWN_SQLSTATES = frozenset({"08000", "08003", "08006"})
NOT_APPLIED, UNKNOWN = "not applied", "unknown outcome"
REPEATABLE = frozenset({
    "log_batch", "log_metric", "log_param", "set_tag", "delete_tag", "set_terminated",
    "update_run", "log_artifact", "log_artifacts", "log_text", "log_dict", "get_run", "search_runs",
    "search_experiments", "get_experiment", "get_experiment_by_name", "get_metric_history",
    "list_artifacts", "download_artifacts", "restore_experiment",
})
# MLflow's HTTP retry settings (environment variables it reads at every request): a read command
# tries twice, 4 s each; a user's own settings win.
IMPATIENT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "4",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

# How long a launch waits for a tracking server that does not answer, saying so every few seconds
SERVER_WAIT_ENV, SERVER_WAIT_S, SAY_EVERY_S = "MIM4DD_SERVER_WAIT_S", 120.0, 5.0

retried: Counter[str] = Counter()  # method -> retries in this process (benchmarks read it)
_impatient = False  # set by `impatient_http`
_log = logging.getLogger(__name__)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# SQLite's own message for each result code above (sqlite3_errstr): the whole message of a
# sqlite3 error that carries no code (Python < 3.11) names its code; a part of one never does.
SQLITE_MESSAGES = {"database is locked": SQLITE_BUSY, "database table is locked": SQLITE_LOCKED,
                   "database disk image is malformed": SQLITE_CORRUPT,
                   "file is not a database": SQLITE_NOTADB,
                   "attempt to write a readonly database": SQLITE_READONLY,
                   "database or disk is full": SQLITE_FULL}


def _sqlite_result(error: BaseException) -> int | None:
    """The primary result code of a sqlite3 error (an extended code keeps it in its low byte);
    None for any other error. Python < 3.11 gives sqlite3 errors no code: there the error's
    whole message is matched against SQLite's own text for the codes this module acts on."""
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    if isinstance(error, sqlite3.Error) and len(error.args) == 1:
        return SQLITE_MESSAGES.get(str(error.args[0]))
    return None


def transient_cause(exc: BaseException) -> str | None:
    """NOT_APPLIED or UNKNOWN for a transient database error in `exc`'s chain, else None."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    for error in chain(exc):
        if isinstance(error, PoolTimeout):  # no connection was handed out: nothing ran
            return NOT_APPLIED
        if _sqlite_result(error) in (SQLITE_BUSY, SQLITE_LOCKED):
            return NOT_APPLIED
        sqlstate = getattr(error, "sqlstate", None)  # psycopg's errors
        if sqlstate in NOT_APPLIED_SQLSTATES:
            return NOT_APPLIED
        if sqlstate in UNKNOWN_SQLSTATES:
            return UNKNOWN
    return None


def refuse_unreadable(path: Path, exc: BaseException) -> None:
    """StoreError (one line: the file, what to do) when `exc` says the embedded store at `path`
    is no database sqlite can read (SQLITE_NOTADB or SQLITE_CORRUPT); else nothing."""
    if any(_sqlite_result(e) in (SQLITE_NOTADB, SQLITE_CORRUPT) for e in chain(exc)):
        raise StoreError(f"{path} is not an MLflow store sqlite can read (corrupted, or another "
                         "kind of file): move it aside, and the next launch starts a new store "
                         "there, or restore it from a backup") from None


def refuse_unwritable(exc: BaseException, store: str) -> None:
    """StoreError (one line: what could not be written, why, what to do) when `exc` says a full
    disk or a read-only file system stopped a write of the sweep's home or of the embedded
    `store`; else nothing."""
    for error in chain(exc):
        if isinstance(error, OSError) and error.errno in UNWRITABLE_ERRNOS:
            what, why = error.filename or store, UNWRITABLE_ERRNOS[error.errno]
        elif (code := _sqlite_result(error)) in UNWRITABLE_SQLITE:
            what, why = store, UNWRITABLE_SQLITE[code]
        else:
            continue
        raise StoreError(f"cannot write {what}: {why}; free space, or point $MIM4DD_HOME (or "
                         "--tracking-uri) at a writable place, and run it again (a launch resumes)"
                         ) from None


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the tracking server could not be reached (refused, reset, timed out)
    after MLflow's own retries."""
    import requests

    return any(isinstance(e, (requests.ConnectionError, requests.Timeout)) for e in chain(exc))


def unreachable_message(uri: str) -> str:
    return (f"cannot reach the tracking server at {uri}: is it running, and is the address right "
            "(--tracking-uri, MLFLOW_TRACKING_URI)?")


def await_server(uri: str, say: Callable[[str], Any]) -> None:
    """Return once the tracking server at `uri` (http or https; any other store returns at once)
    answers, saying every few seconds that it is waited for; StoreError after
    $MIM4DD_SERVER_WAIT_S seconds (default 120). A launch calls this before its first write, so
    it never sits silent in MLflow's own retries (minutes a call)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    patience = float(os.environ.get(SERVER_WAIT_ENV, SERVER_WAIT_S))
    started = next_say = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=4):
                return
        except urllib.error.HTTPError:
            return  # it answers; what its calls say is for them to tell
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
        now = time.monotonic()
        if now - started >= patience:
            raise StoreError(f"{unreachable_message(uri)} (waited {now - started:.0f} s: {reason})")
        if now >= next_say:
            say(f"waiting for the tracking server at {uri} ({now - started:.0f} of "
                f"{patience:.0f} s; {SERVER_WAIT_ENV} sets how long): {reason}")
            next_say = now + SAY_EVERY_S
        time.sleep(min(1.0, max(0.0, patience - (now - started))))


def impatient_http() -> None:
    """This process's MLflow HTTP calls give up within seconds, and a PostgreSQL database is
    tried once (read commands: `probe_database`)."""
    global _impatient
    _impatient = True
    for name, value in IMPATIENT_HTTP.items():
        os.environ.setdefault(name, value)


class StoreError(LookupError):
    """The tracking store cannot be used, and no retry would mend it: one line saying why."""


def probe_database(uri: str) -> None:
    """In a read command (`impatient_http`): one quick connection to a PostgreSQL tracking
    database, and StoreError naming it (without its password) and the server's answer when it
    fails - MLflow itself retries creating its engine for about 100 s, a warning each time."""
    import sqlalchemy

    if not _impatient:
        return
    url = sqlalchemy.engine.make_url(uri)
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 4})
    try:
        with engine.connect():
            return
    except sqlalchemy.exc.OperationalError as exc:
        answer = " ".join(str(exc.orig).split())  # libpq's lines, as one
        raise StoreError(f"cannot use the tracking database "
                         f"{url.render_as_string(hide_password=True)}: {answer}") from None
    finally:
        engine.dispose()


def _retryable(method: str, exc: Exception) -> bool:
    cause = transient_cause(exc)
    return cause == NOT_APPLIED or (cause == UNKNOWN and method in REPEATABLE)


class RetryingClient:
    """An `MlflowClient` whose calls retry transient database errors (see the module
    docstring); everything else passes through unchanged."""

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


__all__ = ["DELAYS_S", "IMPATIENT_HTTP", "SERVER_WAIT_ENV", "RetryingClient", "StoreError",
           "await_server", "chain", "impatient_http", "probe_database", "refuse_unreadable",
           "refuse_unwritable", "retried", "transient_cause", "unreachable",
           "unreachable_message"]
