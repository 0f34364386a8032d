"""The one recipe for the MLflow tracking server trials log to on a cluster.

A PostgreSQL backend store (runs, params, metrics) and proxied artifacts (`--serve-artifacts`:
trials upload through the server, so workers need no storage credentials). The tests start it
with `server_command`; `docker/compose.yaml` and README's cluster section use the same flags,
and a test checks that they agree.
"""

from __future__ import annotations

import sys

# Every flag the recipe sets; any deployment of it must set the same ones.
RECIPE_FLAGS = ("--backend-store-uri", "--artifacts-destination", "--serve-artifacts", "--host",
                "--port", "--workers")
WORKERS = 2
# Each server worker keeps this many PostgreSQL connections. MLflow's default pool (5 + 10
# overflow) ran out under 64 concurrent trials, which then failed or hung the server
# (BENCHMARKS.md section 5); 2 workers x 32 served 64 trials cleanly and stay below
# PostgreSQL's default max_connections (100). Size workers x POOL_SIZE to the trials you run.
POOL_SIZE = 32
# MLflow 3 also starts job-queue consumers (huey) for its GenAI jobs, which this product never
# submits: 8 more processes per server, ~2.5 s of CPU each to start (measured in the test suite).
NO_JOBS_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SERVER_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(POOL_SIZE),
              "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "0", **NO_JOBS_ENV}


def server_command(
    backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
    port: int = 5000, workers: int = WORKERS,
) -> list[str]:
    """`mlflow server` with the recipe's flags (host: loopback unless you say otherwise); run
    it with `SERVER_ENV` in its environment."""
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination, "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def flags_of(arguments: list[str]) -> set[str]:
    """The flag names among command-line arguments (`--port=5000` and `--port 5000` alike)."""
    return {a.split("=", 1)[0] for a in arguments if a.startswith("--")}


__all__ = ["NO_JOBS_ENV", "POOL_SIZE", "RECIPE_FLAGS", "SERVER_ENV", "WORKERS", "flags_of",
           "server_command"]
