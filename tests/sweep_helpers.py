"""Helpers the sweep-service tests share: tiny sweep files, CLI launches, waiting, and a real
`mlflow server` started with the project's one recipe (`orchestrator.server`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml
from mlflow import MlflowClient
from processes import kill_session, stop

from mim4dd import bases
from orchestrator import tracking
from orchestrator.server import SERVER_ENV, server_command

ROOT = Path(__file__).resolve().parents[1]
# Trials that distill scikit-learn's 8x8 digits with an 8-channel ConvNet: about a second each.
TINY = {
    "dataset": "digits",
    "model": {"width": 8},
    "iterations": 6,
    "batch_real": 16,
    "ipc": 1,
    "eval": {"epochs": 30, "lr": 0.1, "num_nets": 2},
}


def write_spec(path: Path, name: str, grid: dict, **fields) -> Path:
    """A sweep file of TINY trials. One trial at a time unless `max_concurrent` says otherwise:
    each concurrent trial is a Ray worker that imports torch, MLflow and Tune (~5 s of CPU), and
    only the tests whose subject is trials at once (the end-to-end grid, PostgreSQL) ask for it."""
    fields.setdefault("max_concurrent", 1)
    spec = {"name": name, "engine": {**TINY, **fields.pop("base", {})}, "grid": grid, **fields}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def wait_for(condition, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def sweep_runs(uri: str, name: str):
    client = MlflowClient(uri)
    parent = tracking.find_sweep_run(client, name)
    return client, parent, tracking.child_runs(client, parent) if parent else []


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def cli_env(home: Path) -> dict:
    env = {**os.environ, tracking.HOME_ENV: str(home)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


GATE_PLUGIN = Path(__file__).parent / "plugins" / "gate_base.py"


class Gate:
    """Base `gated` stopping at iteration `at` until released (tests/plugins/gate_base.py): a
    copy of the plugin in `folder`, with `at` beside it."""

    def __init__(self, folder: Path, at: int, each: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        self.plugin = folder / GATE_PLUGIN.name
        shutil.copy(GATE_PLUGIN, self.plugin)
        self.plugin.with_suffix(".json").write_text(json.dumps({"at": at, "each": each}))
        self.at = at

    @classmethod
    def existing(cls, folder: Path) -> Gate:
        """The gate a test made in `folder` earlier (or a copy of it)."""
        gate = cls.__new__(cls)
        gate.plugin = folder / GATE_PLUGIN.name
        gate.at = json.loads(gate.plugin.with_suffix(".json").read_text())["at"]
        return gate

    def env(self, home: Path) -> dict:
        """`cli_env` with the plugin loaded (the driver validates base `gated` with it)."""
        return {**cli_env(home), bases.PLUGINS_ENV: str(self.plugin)}

    def reached(self) -> bool:
        return self.plugin.with_suffix(".reached").exists()

    def trials_waiting(self) -> int:
        """With `each`: how many trials stand at the gate."""
        return len(list(self.plugin.parent.glob(f"{self.plugin.stem}.reached-*")))

    def release(self) -> None:
        self.plugin.with_suffix(".release").touch()


# A trial that checkpoints at 10 and 20 and stops at iteration 25 until its gate is released.
GATED = {"base": "gated", "iterations": 60}
GATE_AT, GATE_CHECKPOINT_EVERY = 25, 10


def launch_to_gate(
    tmp_path: Path, home: Path, name: str, uri: str | None = None, grid: dict | None = None,
) -> tuple[subprocess.Popen, Gate]:
    """A CLI launch (logging to `uri`, default the embedded store) of one 60-iteration trial,
    returned when the trial stands at its gate, iteration 25, with checkpoints of iterations 10
    and 20 written; `grid` adds trials (which reach no gate if shorter)."""
    gate = Gate(tmp_path / "gate", GATE_AT)
    path = write_spec(tmp_path / f"{name}.yaml", name, grid or {"seed": [0]},
                      base=GATED, checkpoint_every=GATE_CHECKPOINT_EVERY,
                      **({"tracking_uri": uri} if uri else {}))
    log = open(tmp_path / f"{name}.log", "w")
    driver = subprocess.Popen(cli("launch", str(path)), cwd=ROOT, env=gate.env(home), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: gate.reached() or driver.poll() is not None, 240, f"{name}: the gate")
        assert gate.reached(), (tmp_path / f"{name}.log").read_text()
    except BaseException:
        kill_session(driver)
        raise
    return driver, gate


def relaunch(tmp_path: Path, gate: Gate, home: Path, name: str) -> subprocess.CompletedProcess:
    """The same sweep launched again from the CLI, to the end."""
    return subprocess.run(cli("launch", str(tmp_path / f"{name}.yaml")), cwd=ROOT,
                          env=gate.env(home), capture_output=True, text=True, timeout=300)


def checkpoints(home: Path, name: str, trial: str = "*") -> list[Path]:
    """The checkpoint folders of a sweep's trials, every launch's."""
    return sorted((home / "ray_results" / name).glob(f"*/{trial}/checkpoint_*"))


def log_one_dataset_at_once(client, data, trials: int = 8) -> str:
    """`trials` new runs of a new experiment log `data`'s splits as inputs at one instant (a
    barrier), as trials of one sweep starting together do; returns the experiment's id.
    Checks that every run holds its three inputs."""
    from orchestrator.trial_run import TrialRun

    experiment = client.create_experiment(f"same-dataset-{time.time_ns()}")
    runs = [TrialRun(client, client.create_run(experiment)) for _ in range(trials)]
    start = threading.Barrier(len(runs))

    def log(run: TrialRun) -> None:
        start.wait(timeout=60)
        run.log_inputs(data)

    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(log, runs))  # re-raises the first failure
    for run in runs:
        inputs = client.get_run(run.run_id).inputs.dataset_inputs
        assert sorted(i.tags[0].value for i in inputs) == ["test", "training", "validation"]
    return experiment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, backend_store_uri: str) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (the recipe's flags, one worker), until the block
    ends; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    command = server_command(backend_store_uri, str(root / "artifacts"), port=free_port(),
                             workers=1)
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **SERVER_ENV}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)
        log.close()
