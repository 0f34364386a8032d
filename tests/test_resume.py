"""Crashes and restarts of a sweep: a killed driver, a SIGTERM, checkpoints gone, renamed or
left by an earlier launch, changed Tune settings - and every step logged once after it all.

Trials stop at an exact iteration (the test-only `gated` base, tests/plugins/gate_base.py):
"killed at iteration 25, with checkpoints of iterations 10 and 20" is the same every run. The
tests whose subject is the embedded launch end to end run both launches from the CLI, each with
the Ray cluster it starts; the rest share one killed sweep (`killed`) and relaunch it
in-process on the session's Ray cluster.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
from conftest import use_plugin  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from processes import HAS_PROC, kill_session  # noqa: E402

from mim4dd.synset import SyntheticSet  # noqa: E402
from orchestrator import queries, service, tracking, tune_run  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from sweep_helpers import (  # noqa: E402
    ROOT, Gate, checkpoints, cli, launch_to_gate, relaunch, sweep_runs, wait_for,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAS_PROC, reason="finds processes in /proc")]


def test_kill_and_relaunch_resumes_from_checkpoints(home, tmp_path):
    first, gate = launch_to_gate(tmp_path, home, "resume", grid={"iterations": [4, 60]})
    client = MlflowClient(tracking.resolve_tracking_uri())

    def short_done() -> bool:
        runs = {r.data.tags[tracking.TAG_KEY]: r
                for r in sweep_runs(tracking.resolve_tracking_uri(), "resume")[2]}
        return "iterations=4" in runs and runs["iterations=4"].info.status == "FINISHED"

    try:
        wait_for(short_done, 240, "the short trial to finish")
    finally:
        kill_session(first)  # the driver, the Ray cluster it started and the trial workers
    parent = tracking.find_sweep_run(client, "resume")
    long = {r.data.tags[tracking.TAG_KEY]: r for r in tracking.child_runs(client, parent)}
    assert long["iterations=60"].info.status == "RUNNING", (tmp_path / "resume.log").read_text()

    second = relaunch(tmp_path, gate, home, "resume")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2/2 finished (1 before this launch)" in second.stdout, second.stdout
    assert "1 resumed from checkpoints" in second.stdout, second.stdout

    parent = tracking.find_sweep_run(client, "resume")
    children = tracking.child_runs(client, parent)
    keys = [r.data.tags[tracking.TAG_KEY] for r in children]
    assert sorted(keys) == ["iterations=4", "iterations=60"]  # no duplicate child runs
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED"
    by_key = dict(zip(keys, children, strict=True))
    assert by_key["iterations=60"].data.tags[tracking.TAG_RESUMED] == "20"  # the gate's checkpoint
    assert tracking.TAG_RESUMED not in by_key["iterations=4"].data.tags
    steps = [m.step for m in client.get_metric_history(by_key["iterations=60"].info.run_id,
                                                       "loss")]
    assert sorted(steps) == list(range(1, 61))  # every step once, none lost or doubled
    assert SyntheticSet.load(queries.pull(by_key["iterations=60"].info.run_id,
                                           tmp_path / "set")).manifest["iterations_done"] == 60
    # Every trial finished: the killed launch's folder, spent, is gone; only this launch's left.
    assert len(list((home / "ray_results" / "resume").iterdir())) == 1


def test_sigterm_stops_like_ctrl_c(ray_cluster, home, tmp_path, monkeypatch):
    driver, gate = launch_to_gate(tmp_path, home, "term")
    env = gate.env(home)
    try:
        shown = CliRunner().invoke(app, ["status", "term"])  # the launch holds the sweep's lock
        assert "term (RUNNING): 0/1 done, 1 running, 0 interrupted" in shown.output, shown.output
        # From another terminal: SIGTERM to the launch, what `timeout` and schedulers send too.
        stopped = subprocess.run(cli("stop", "term"), cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and str(driver.pid) in stopped.stdout, stopped.stderr
        gate.release()  # the trial goes on to its next report, where Tune stops it
        assert driver.wait(timeout=120) != 0
    finally:
        kill_session(driver)
    nothing = subprocess.run(cli("stop", "term"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 1 and "no launch of sweep 'term' is running" in nothing.stderr
    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "term")
    log = (tmp_path / "term.log").read_text()
    assert parent.info.status == "KILLED", log
    # The launch's own summary and hint, and no stack dump or Tune advice (Tuner.restore)
    assert "term: KILLED; 0/1 finished" in log and "run the same command again" in log, log
    assert "Traceback" not in log and "Tuner.restore" not in log, log
    assert [r.info.status for r in children] == ["KILLED"]  # nothing left RUNNING

    # Tune's own state is never restored (it would unpickle it): a broken one blocks nothing.
    [launch] = (home / "ray_results" / "term").iterdir()
    (launch / "tuner.pkl").write_bytes(b"not a pickle")
    use_plugin(monkeypatch, gate.plugin)  # relaunched in this process, on the shared cluster
    again = service.launch(load_spec(tmp_path / "term.yaml"), progress=False)
    assert again.status == "FINISHED" and again.resumed == 1
    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "term")
    assert [r.info.status for r in children] == ["FINISHED"]  # the same run, finished
    assert int(children[0].data.tags[tracking.TAG_RESUMED]) >= 20


@dataclass
class Killed:
    """A killed sweep's folder: its home (MLflow store, Tune folders), sweep file and gate."""

    work: Path

    @property
    def home(self) -> Path:
        return self.work / "home"

    @property
    def gate(self) -> Gate:
        return Gate.existing(self.work / "gate")

    def relaunch(self) -> service.SweepOutcome:
        return service.launch(load_spec(self.work / "killed.yaml"), progress=False)


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory, template_db) -> Killed:
    """Sweep `killed` as a SIGKILL of its CLI launch left it: its one 60-iteration trial RUNNING
    in MLflow at its gate (iteration 25), with the checkpoint of iteration 20 on disk."""
    work = tmp_path_factory.mktemp("killed") / "work"
    (work / "home").mkdir(parents=True)
    shutil.copy(template_db, work / "home" / "mlflow.db")
    driver, _ = launch_to_gate(work, work / "home", "killed")
    kill_session(driver)
    return Killed(work)


@pytest.fixture
def killed(killed_once, ray_cluster, tmp_path, monkeypatch) -> Killed:
    """A copy of the killed sweep for this test alone, relaunched in this process."""
    copy = Killed(tmp_path / "work")
    shutil.copytree(killed_once.work, copy.work, symlinks=True)
    with sqlite3.connect(copy.home / "mlflow.db") as db:  # the artifacts move with the store
        old, new = killed_once.home.as_uri(), copy.home.as_uri()
        db.execute("UPDATE experiments SET artifact_location = "
                   "replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    db.close()
    monkeypatch.setenv(tracking.HOME_ENV, str(copy.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    use_plugin(monkeypatch, copy.gate.plugin)
    client, _, [run] = sweep_runs(tracking.resolve_tracking_uri(), "killed")
    assert run.info.status == "RUNNING"
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith(new)
    return copy


def test_a_deleted_checkpoint_does_not_block_the_sweep(killed):
    # The store still says RUNNING, but no launch holds the sweep's lock: status says so.
    shown = CliRunner().invoke(app, ["status", "killed"])
    assert shown.exit_code == 0, shown.output
    assert "killed (INTERRUPTED): 0/1 done, 0 running, 1 interrupted" in shown.output
    assert "seed=0 │ INTERRUPTED" in shown.output
    assert [row["status"] for row in queries.list_sweeps()] == ["INTERRUPTED"]
    for checkpoint in checkpoints(killed.home, "killed"):
        shutil.rmtree(checkpoint)

    outcome = killed.relaunch()
    assert outcome.status == "FINISHED" and outcome.resumed == 0
    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "killed")
    assert parent.info.status == "FINISHED"
    assert [r.info.status for r in children] == ["FINISHED"]  # the same child run, finished
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # redone from scratch, each step logged once
    assert tracking.TAG_RESUMED not in children[0].data.tags  # no checkpoint left to resume


def test_a_relaunch_with_a_changed_max_concurrent_uses_it_and_still_resumes(killed):
    # Restoring Tune's experiment kept the max_concurrent and retries it was started with, so
    # a changed one was ignored without a word (found running sweeps/mim_choices_dm); every
    # launch is a fresh Tune experiment now.
    path = killed.work / "killed.yaml"
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "max_concurrent": 2, "retries": 3}, sort_keys=False))

    outcome = killed.relaunch()
    assert outcome.status == "FINISHED" and outcome.resumed == 1
    [launch] = (killed.home / "ray_results" / "killed").iterdir()  # the killed one's is spent
    settings = json.loads((launch / tune_run.SETTINGS_FILE).read_text())
    assert settings["max_concurrent"] == 2 and settings["retries"] == 3
    client, parent, [child] = sweep_runs(tracking.resolve_tracking_uri(), "killed")
    assert child.info.status == "FINISHED" and child.data.tags[tracking.TAG_RESUMED] == "20"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # every step once, none lost or doubled


def test_the_newest_checkpoint_on_disk_is_resumed_from(killed):
    # Tune's driver deletes a trial's older checkpoint when it registers the newer one and
    # saves the state naming it a moment later; a kill in between left Tune's state naming a
    # checkpoint gone while a newer one existed (it failed CI once). Made certain here: the
    # newest checkpoint is renamed to the next index, past any Tune's state could name.
    *_, newest = checkpoints(killed.home, "killed")
    newer = newest.with_name(f"checkpoint_{int(newest.name.split('_')[1]) + 1:06d}")
    newest.rename(newer)
    saved = json.loads((newer / "trial.json").read_text())
    assert saved["iteration"] == 20

    outcome = killed.relaunch()
    assert outcome.status == "FINISHED" and outcome.resumed == 1
    client, parent, [child] = sweep_runs(tracking.resolve_tracking_uri(), "killed")
    assert child.info.status == "FINISHED" and child.info.run_id == saved["run_id"]
    assert child.data.tags[tracking.TAG_RESUMED] == "20"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # every step once, none lost or doubled
