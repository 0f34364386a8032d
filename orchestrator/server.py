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
                "--port")


def server_command(
    backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
    port: int = 5000, workers: int | None = None,
) -> list[str]:
    """`mlflow server` with the recipe's flags (host: loopback unless you say otherwise)."""
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", artifacts_destination, "--serve-artifacts",
               "--host", host, "--port", str(port)]
    if workers is not None:  # gunicorn/uvicorn workers: memory against concurrency
        command += ["--workers", str(workers)]
    return command


def flags_of(arguments: list[str]) -> set[str]:
    """The flag names among command-line arguments (`--port=5000` and `--port 5000` alike)."""
    return {a.split("=", 1)[0] for a in arguments if a.startswith("--")}


__all__ = ["RECIPE_FLAGS", "flags_of", "server_command"]
