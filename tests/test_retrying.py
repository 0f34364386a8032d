"""Transient tracking-store errors are retried by cause (the error's type and code, never its
text), where that is safe, and only there; an unreachable server is one line in seconds."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException
from sweep_helpers import ROOT, cli, cli_env, free_port, write_spec
from typer.testing import CliRunner

from orchestrator import retrying, tracking
from orchestrator.cli import app
from orchestrator.retrying import NOT_APPLIED, UNKNOWN, RetryingClient, transient_cause


def as_mlflow_raises(error: Exception) -> MlflowException:
    """`error` as MLflow's stores pass it on: an MlflowException raised while handling it."""
    try:
        raise error
    except Exception:
        try:
            raise MlflowException(f"wrapped: {error}")
        except MlflowException as wrapped:
            return wrapped


def locked_sqlite_error(tmp_path) -> Exception:
    """SQLAlchemy's error for a write to a sqlite file another connection holds locked."""
    path = tmp_path / "store.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with engine.begin() as db:
        db.execute(sqlalchemy.text("CREATE TABLE t (v INTEGER)"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with engine.begin() as db:
            db.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    except sqlalchemy.exc.OperationalError as exc:
        return exc
    finally:
        holder.close()
        engine.dispose()
    raise AssertionError("the write went through a held lock")


def serialization_failure() -> Exception:
    """PostgreSQL's 40001 for a repeatable-read update of a row another transaction changed."""
    psycopg = pytest.importorskip("psycopg")
    where = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
    try:
        first = psycopg.connect(connect_timeout=3, **where)
        other = psycopg.connect(connect_timeout=3, autocommit=True, **where)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({str(exc).strip()})")
    table = f"retry_probe_{int(time.time() * 1e6)}"
    try:
        other.execute(f"CREATE TABLE {table} (v int)")
        other.execute(f"INSERT INTO {table} VALUES (1)")
        first.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        first.execute(f"SELECT v FROM {table}").fetchall()
        other.execute(f"UPDATE {table} SET v = 2")
        with pytest.raises(psycopg.errors.SerializationFailure) as caught:
            first.execute(f"UPDATE {table} SET v = 3")
        return caught.value
    finally:
        first.close()
        other.execute(f"DROP TABLE IF EXISTS {table}")
        other.close()


class Store:
    """Calls that fail with the given (real) errors first, then answer."""

    def __init__(self, **failures):
        self.failures = {name: list(errors) for name, errors in failures.items()}
        self.calls: list[str] = []

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append(name)
            if self.failures.get(name):
                raise self.failures[name].pop(0)
            return f"{name} done"
        return method


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(retrying.time, "sleep", lambda seconds: None)


def test_a_locked_sqlite_store_is_waited_out_for_every_call(tmp_path):
    locked = as_mlflow_raises(locked_sqlite_error(tmp_path))
    assert transient_cause(locked) == NOT_APPLIED  # sqlite's SQLITE_BUSY: nothing was written
    store = Store(create_run=[locked, locked], log_batch=[locked])
    client = RetryingClient(store)
    assert client.create_run("0") == "create_run done"
    assert client.log_batch("run") == "log_batch done"
    assert store.calls == ["create_run"] * 3 + ["log_batch"] * 2


def test_without_sqlite_codes_the_whole_sqlite_message_decides(tmp_path):
    # Python 3.10's sqlite3 errors carry no code: SQLite's whole message stands for it, and a
    # message that merely contains it is no locked store.
    bare = sqlite3.OperationalError("database is locked")  # made here: no sqlite_errorcode
    assert getattr(bare, "sqlite_errorcode", None) is None
    assert transient_cause(as_mlflow_raises(bare)) == NOT_APPLIED
    assert transient_cause(as_mlflow_raises(
        sqlite3.OperationalError("no such table: database is locked"))) is None
    assert transient_cause(as_mlflow_raises(MlflowException("database is locked"))) is None
    with pytest.raises(retrying.StoreError, match="the disk is full"):
        retrying.refuse_unwritable(sqlite3.OperationalError("database or disk is full"), "store")


def test_postgres_serialization_failures_are_retried():
    assert transient_cause(as_mlflow_raises(serialization_failure())) == NOT_APPLIED


def test_a_broken_connection_is_retried_only_where_repeating_is_harmless():
    psycopg = pytest.importorskip("psycopg")
    broken = as_mlflow_raises(psycopg.errors.lookup("08006")("connection lost mid-call"))
    assert transient_cause(broken) == UNKNOWN
    store = Store(log_batch=[broken], create_run=[broken])
    client = RetryingClient(store)
    assert client.log_batch("run") == "log_batch done"  # metric rows it holds are skipped
    with pytest.raises(MlflowException, match="connection lost"):
        client.create_run("0")  # it may exist already: a retry could make a second run
    assert store.calls.count("create_run") == 1


def test_text_that_looks_transient_is_not_retried(tmp_path):
    # A run id with "503" in it, a path that "timed out": the old text matching retried these
    # for a minute before the error stood.
    looks = MlflowException("Run '05030503050305030503050305030503' not found; timed out")
    assert transient_cause(looks) is None
    store = Store(get_run=[looks], set_tag=[as_mlflow_raises(locked_sqlite_error(tmp_path))]
                  * (len(retrying.DELAYS_S) + 1))
    client = RetryingClient(store)
    with pytest.raises(MlflowException, match="not found"):
        client.get_run("05030503050305030503050305030503")
    assert store.calls == ["get_run"]
    with pytest.raises(MlflowException, match="wrapped"):  # a lasting outage surfaces
        client.set_tag("run", "k", "v")
    assert store.calls.count("set_tag") == len(retrying.DELAYS_S) + 1


def test_pulling_a_missing_run_answers_at_once(home, tmp_path):
    before = sum(retrying.retried.values())
    result = CliRunner().invoke(app, ["pull", "0503" * 8, "--out", str(tmp_path / "set")])
    assert result.exit_code == 1 and "cannot pull 0503" in result.output, result.output
    assert sum(retrying.retried.values()) == before


def test_a_postgres_database_that_does_not_exist_is_one_line_at_once(tmp_path):
    pytest.importorskip("psycopg")
    uri = "postgresql://postgres@127.0.0.1:5432/mim4dd_no_such_database"
    serialization_failure()  # skips where no PostgreSQL answers
    for command in (["status", "demo"], ["list"]):
        result = CliRunner().invoke(app, [*command, "--tracking-uri", uri])
        assert result.exit_code == 1, result.output
        [line] = result.output.strip().splitlines()  # not MLflow's ~100 s of retry warnings
        assert line.startswith("cannot use the tracking database postgresql://postgres@127.0.0.1"
                               ":5432/mim4dd_no_such_database: ") and line.endswith(
            'database "mim4dd_no_such_database" does not exist'), line


def test_read_commands_give_one_line_when_the_server_is_unreachable(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command in (["status", "demo"], ["report", "demo"], ["list"]):
        started = time.monotonic()
        done = subprocess.run(cli(*command, "--tracking-uri", url), cwd=ROOT,
                              env=cli_env(tmp_path / "home"), capture_output=True, text=True,
                              timeout=60)
        took = time.monotonic() - started
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.strip() == (
            f"cannot reach the tracking server at {url}: is it running, and is the address "
            "right (--tracking-uri, MLFLOW_TRACKING_URI)?"), done.stderr
        assert took < 20, f"{command[0]} took {took:.1f} s"  # was many minutes


def test_a_launch_waits_for_an_unreachable_server_saying_so_then_stops_with_one_line(
        tmp_path, monkeypatch):
    # Before: MLflow's own retries, silent for about 4 minutes a call, then a traceback.
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv(retrying.SERVER_WAIT_ENV, "6")
    monkeypatch.setenv(tracking.HOME_ENV, str(tmp_path / "home"))
    spec = write_spec(tmp_path / "away.yaml", "away", {"lam": [0]})
    result = CliRunner().invoke(app, ["launch", str(spec), "--tracking-uri", url])
    assert result.exit_code == 1, result.output
    *waiting, last = result.output.strip().splitlines()
    assert len(waiting) == 2, result.output  # at once, then 5 s later
    assert all(line.startswith(f"waiting for the tracking server at {url} (") for line in waiting)
    assert last.startswith(f"{retrying.unreachable_message(url)} (waited 6 s"), last
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing was written anywhere


def test_a_server_that_comes_up_while_waited_for_is_used(monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    said: list[str] = []
    servers: list[ThreadingHTTPServer] = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    def say(line: str) -> None:  # the first "waiting" line starts the server
        said.append(line)
        if not servers:
            servers.append(ThreadingHTTPServer(("127.0.0.1", port), Health))
            threading.Thread(target=servers[0].serve_forever, daemon=True).start()

    monkeypatch.setenv(retrying.SERVER_WAIT_ENV, "60")
    try:
        retrying.await_server(url, say)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert len(said) == 1 and "waiting for the tracking server" in said[0]
    retrying.await_server("sqlite:///nowhere/mlflow.db", say)  # a database store: no wait
    assert len(said) == 1
