"""A sweep on a two-node Ray cluster logging to an MLflow tracking server over HTTP.

Both nodes and the server run on this machine, but nothing is shared in-process: the sweep
is launched by the CLI in its own process with `--address` and `--tracking-uri`, its trials
run on whichever node Ray picks (one CPU per node, so two trials need both), every trial logs
and uploads its set through the server's artifact proxy, and the set is pulled back over HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from processes import HAS_PROC  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from mim4dd.synset import SyntheticSet  # noqa: E402
from orchestrator import queries, tracking, tune_run  # noqa: E402
from sweep_helpers import mlflow_server as start_mlflow_server  # noqa: E402

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_PROC, reason="finds processes in /proc"),
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
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
    spec = {
        "name": "cluster",
        # Long enough (~10 s a trial) that the two trials overlap and so take one node each:
        # at 60 iterations a trial took ~3.6 s, and one started after the other had finished
        # could land on the same node (1 failure in 3 runs).
        "engine": {"dataset": "digits", "model": {"width": 8}, "iterations": 240,
                 "batch_real": 16, "ipc": 1, "eval": {"epochs": 90, "lr": 0.1, "num_nets": 2}},
        "grid": {"seed": [0, 1]},
        "resources": {"cpu": 1},
        "checkpoint_every": 20,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    env = {**os.environ, tracking.HOME_ENV: str(home)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)

    launched = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "launch", str(path),
         "--address", cluster.address, "--tracking-uri", mlflow_server],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "2/2 finished" in launched.stdout
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
