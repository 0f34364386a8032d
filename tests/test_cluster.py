"""A sweep on a two-node Ray cluster logging to an MLflow tracking server over HTTP.

Both nodes and the server run on this machine, but nothing is shared in-process: the sweep
is launched by the CLI in its own process with `--address` and `--tracking-uri`, its two trials
are held at once (one CPU per node: one trial on each), every trial logs and uploads its set
through the server's artifact proxy, and the set is pulled back over HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from conftest import stop_shared_ray  # noqa: E402
from processes import HAS_PROC, kill_session  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from mim4dd.synset import SyntheticSet  # noqa: E402
from orchestrator import queries, tracking, tune_run  # noqa: E402
from sweep_helpers import ROOT, TINY, Gate, cli, wait_for  # noqa: E402
from sweep_helpers import mlflow_server as start_mlflow_server  # noqa: E402

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_PROC, reason="finds processes in /proc"),
]

@pytest.fixture(scope="module")
def cluster():
    stop_shared_ray()  # this process joins no cluster: its loopback one confused this one's address
    # A private Ray temp dir (short: it holds unix sockets), so this cluster's address file
    # never makes another process's plain `ray.init()` join it.
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", *tune_run.RAY_ENV)}
    os.environ["RAY_TMPDIR"] = temp
    for name, value in tune_run.RAY_ENV.items():
        os.environ.setdefault(name, value)
    nodes = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as url:
        yield url


def test_sweep_on_two_nodes_with_tracking_server(cluster, mlflow_server, tmp_path):
    # Each node has one CPU and each trial takes one; both trials stop at a gate (iteration 3)
    # until the test has seen both there, so they run at once and must be on different nodes.
    gate = Gate(tmp_path / "gate", at=3, each=True)
    spec = {
        "name": "cluster",
        "engine": {**TINY, "base": "gated", "iterations": 8},
        "grid": {"seed": [0, 1]},
        "resources": {"cpu": 1},
        "checkpoint_every": 4,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    log = open(tmp_path / "launch.log", "w")
    launched = subprocess.Popen(
        cli("launch", str(path), "--address", cluster.address, "--tracking-uri", mlflow_server),
        cwd=ROOT, env=gate.env(home), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: gate.trials_waiting() == 2 or launched.poll() is not None, 240,
                 "both trials at the gate")
        gate.release()
        assert launched.wait(timeout=240) == 0, (tmp_path / "launch.log").read_text()
    finally:
        kill_session(launched)
        log.close()
    assert "2/2 finished" in (tmp_path / "launch.log").read_text()
    assert not (home / "mlflow.db").exists()  # everything went to the server

    client = MlflowClient(mlflow_server)
    parent = tracking.find_sweep_run(client, "cluster")
    children = tracking.child_runs(client, parent)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags[tracking.TAG_KEY] for r in children) == ["seed=0", "seed=1"]
    assert all(r.info.status == "FINISHED" for r in children)
    # proxied artifacts: uploaded through the server, not written by path
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children)

    node_ids = {n.node_id for n in cluster.list_all_nodes()}
    used = {r.data.tags["mim4dd.node_id"] for r in children}
    assert len(node_ids) == 2 and used == node_ids  # one trial on each node

    folder = queries.pull(children[0].info.run_id, tmp_path / "pulled", mlflow_server)
    synset = SyntheticSet.load(folder)
    assert len(synset.to_dataset()) == 10
    assert synset.manifest["config"]["seed"] == int(children[0].data.params["seed"])
