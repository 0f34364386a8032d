"""Helpers the sweep-service tests share: tiny sweep files, CLI launches, waiting, and a real
`mlflow server` started with the project's one recipe (`orchestrator.server`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from mlflow import MlflowClient
from processes import kill_session, stop

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


def launch_until_checkpointed(
    tmp_path: Path, home: Path, name: str, uri: str | None = None
) -> subprocess.Popen:
    """A CLI launch of one long trial (logging to `uri`, default the embedded store), returned
    once Tune holds its second checkpoint."""
    path = write_spec(tmp_path / f"{name}.yaml", name, {"iterations": [600]}, checkpoint_every=10,
                      **({"tracking_uri": uri} if uri else {}))
    log = open(tmp_path / f"{name}.log", "w")
    driver = subprocess.Popen(cli("launch", str(path)), cwd=ROOT, env=cli_env(home), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(uri or tracking.resolve_tracking_uri())

    def checkpointed() -> bool:
        parent = tracking.find_sweep_run(client, name)
        runs = tracking.child_runs(client, parent) if parent else []
        checkpoints = [int(p.name.split("_")[1]) for p in
                       (home / "ray_results" / name).glob("iterations=600_*/checkpoint_*")]
        return bool(runs) and runs[0].info.status == "RUNNING" and max(checkpoints, default=0) >= 2

    try:
        wait_for(checkpointed, 240, f"{name}: a checkpointed trial")
        time.sleep(0.5)  # let the driver snapshot the experiment state after that checkpoint
    except BaseException:
        kill_session(driver)
        raise
    return driver


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
