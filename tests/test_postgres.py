"""The production tracking path: a real `mlflow server` on 127.0.0.1 with a PostgreSQL backend
store and proxied artifacts (`orchestrator.server`'s recipe), each test on a database of its own.
The same sweep assertions as on the embedded store: parent and child runs, metrics, artifacts,
report, pull, and resume after a killed driver. Skipped, with the reason, where no PostgreSQL
answers on 127.0.0.1:5432 (CI's machines run one)."""

from __future__ import annotations

import secrets

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
psycopg = pytest.importorskip("psycopg", reason="the sweep extra's PostgreSQL driver")
from conftest import use_plugin  # noqa: E402
from processes import HAS_PROC, kill_session  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mim4dd.metrics import TEST_ACC_MEAN, TEST_ACC_STD  # noqa: E402
from mim4dd.synset import SyntheticSet  # noqa: E402
from orchestrator import retrying, service, tracking  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from sweep_helpers import (  # noqa: E402
    ROOT, launch_to_gate, log_one_dataset_at_once, mlflow_server, sweep_runs, write_spec,
)

pytestmark = pytest.mark.slow
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def _admin():
    try:  # autocommit: CREATE/DROP DATABASE refuse to run in a transaction
        return psycopg.connect(connect_timeout=3, autocommit=True, **POSTGRES)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({str(exc).strip()})")


@pytest.fixture(scope="module")
def postgres_uri():
    """A fresh database for this module, dropped afterwards (its connections closed first)."""
    name = f"mim4dd_test_{secrets.token_hex(4)}"
    admin = _admin()
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = %s", (name,))
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    """One server for the module (its start migrates the database: ~20 s); each test logs to
    sweeps and experiments of its own."""
    with mlflow_server(tmp_path_factory.mktemp("server"), postgres_uri) as url:
        yield url


def test_a_sweep_through_the_postgres_server(ray_cluster, home, tmp_path, server):
    spec = load_spec(write_spec(tmp_path / "pg.yaml", "pg", {"lam": [0, 0.8]},
                                checkpoint_every=3, tracking_uri=server, max_concurrent=2))
    outcome = service.launch(spec, progress=False)
    assert outcome.status == "FINISHED" and sorted(outcome.finished) == ["lam=0", "lam=0.8"]
    assert outcome.tracking_uri == server

    client, parent, children = sweep_runs(server, "pg")
    assert parent.info.status == "FINISHED" and len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert {TEST_ACC_MEAN, TEST_ACC_STD, "loss"} <= set(run.data.metrics)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 7))  # every step once
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert names == {"synset", "results.json", "images"}  # images: the set's preview

    report = CliRunner().invoke(app, ["report", "pg", "--tracking-uri", server])
    assert report.exit_code == 0 and "seed-level" in report.output, report.output
    pulled = CliRunner().invoke(app, ["pull", "pg", "--lam", "0.8", "--out",
                                      str(tmp_path / "set"), "--tracking-uri", server])
    assert pulled.exit_code == 0, pulled.output
    assert SyntheticSet.load(tmp_path / "set").manifest["config"]["lam"] == 0.8


def test_trials_logging_the_same_dataset_at_one_instant_all_succeed(digits, server, postgres_uri):
    """PostgreSQL refuses the second of two concurrent inserts of one (experiment, name,
    digest) dataset row; a trial meeting that collision must take the row the other wrote.
    Eight trials start their `log_inputs` together (a barrier), so the inserts collide."""
    experiment = log_one_dataset_at_once(tracking.connect(server), digits)
    with psycopg.connect(postgres_uri) as db:
        rows = db.execute("SELECT name, digest, count(*) FROM datasets WHERE experiment_id = %s "
                          "GROUP BY name, digest", (int(experiment),))
        assert [count for *_, count in rows] == [1, 1, 1]  # one row per split, shared by all


def test_a_missing_sweep_or_run_answers_at_once_through_the_server(server, tmp_path):
    before = sum(retrying.retried.values())
    status = CliRunner().invoke(app, ["status", "no-such-sweep", "--tracking-uri", server])
    assert status.exit_code == 1 and "no sweep named 'no-such-sweep'" in status.output
    pulled = CliRunner().invoke(app, ["pull", "0503" * 8, "--out", str(tmp_path / "set"),
                                      "--tracking-uri", server])
    assert pulled.exit_code == 1 and "cannot pull 0503" in pulled.output, pulled.output
    assert sum(retrying.retried.values()) == before  # nothing was retried


@pytest.mark.skipif(not HAS_PROC, reason="finds processes in /proc")
def test_resume_after_a_killed_driver_on_postgres(ray_cluster, home, tmp_path, server,
                                                  monkeypatch):
    driver, gate = launch_to_gate(tmp_path, home, "pgresume", uri=server)
    kill_session(driver)
    use_plugin(monkeypatch, gate.plugin)  # relaunched in this process, on the shared cluster
    again = service.launch(load_spec(tmp_path / "pgresume.yaml"), progress=False)
    assert again.status == "FINISHED" and again.resumed == 1

    client, parent, children = sweep_runs(server, "pgresume")
    assert parent.info.status == "FINISHED"
    [run] = children  # the same child run, continued
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_RESUMED] == "20"  # the checkpoint before the gate
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # none lost, none doubled


def test_the_server_recipe_is_the_documented_one():
    """README's cluster section and docker/compose.yaml start the server with the flags these
    tests use."""
    import yaml

    from orchestrator.server import RECIPE_FLAGS, SERVER_ENV, WORKERS, flags_of, server_command

    assert flags_of(server_command("postgresql://x", "/a")) == set(RECIPE_FLAGS)
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["mlflow"]
    assert flags_of(compose["command"]) == set(RECIPE_FLAGS)
    assert f"--workers={WORKERS}" in compose["command"]
    assert {k: str(v) for k, v in compose["environment"].items() if k in SERVER_ENV} == SERVER_ENV
    readme = (ROOT / "README.md").read_text()
    [block] = [part for part in readme.split("```") if "mlflow server --backend" in part]
    words = block.replace("\\\n", " ").split()
    assert flags_of(words) == set(RECIPE_FLAGS) and str(WORKERS) in words
    assert all(f"{k}={v}" in words for k, v in SERVER_ENV.items())
