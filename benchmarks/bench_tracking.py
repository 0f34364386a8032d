"""Tracking load: K concurrent trials logging to MLflow the way the sweep service does.

Each trial runs in a Ray task on a local Ray cluster and trains nothing: it makes the MLflow
calls of `orchestrator.trainable` through the service's own `TrialRun` (open the child run;
`log_iteration` with the 8 metrics a dm trial logs at lam 0.8; `flush()` every
--flush-every steps, as at each checkpoint; `log_evaluation`; `log_outputs` of a one-file set
folder and a results file; `finish`). An exception ends the trial as in the trainable
(`TrialRun.fail`), without retrying it. Each task connects, then waits at a gate: all K start
together. At most --max-procs trial processes run (each imports torch and mlflow, ~0.5 GB);
beyond that a process runs several trials in threads.

Stores, interleaved (per K the order alternates): `sqlite`, a fresh embedded
sqlite:///<tmp>/mlflow.db per K written by every trial process; `server`, one `mlflow server`
(uvicorn, --server-workers) on 127.0.0.1 with a fresh PostgreSQL database and proxied
artifacts, a new experiment per K. Afterwards the rows are counted in the database itself.
Retries: urllib3 retries in the trial processes, counted by wrapping `Retry.increment`, plus
the service's own retries of transient store errors (`orchestrator.retrying.retried`).

    python benchmarks/bench_tracking.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from pathlib import Path

from _common import print_table

METRICS = ("loss", "loss_base", "loss_mim", "loss_mim_block1", "loss_mim_block2",
           "loss_mim_block3", "lr_img", "seconds_per_iteration")
PG = "postgresql://postgres@127.0.0.1:5432"
TRACKING_HOST = "127.0.0.1"


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def count_retries() -> Counter:
    """Wrap urllib3's Retry.increment (once per process): a live count by "host: cause"."""
    from urllib3.util.retry import Retry

    if hasattr(Retry.increment, "counts"):
        return Retry.increment.counts
    original, counts = Retry.increment, Counter()

    def increment(self, *args, **kwargs):
        response, error = kwargs.get("response"), kwargs.get("error")
        host = getattr(kwargs.get("_pool"), "host", "?")
        cause = f"HTTP {response.status}" if response is not None else type(error).__name__
        try:
            retry = original(self, *args, **kwargs)
        except Exception:
            counts[f"{host}: gave up after {cause}"] += 1
            raise
        counts[f"{host}: {cause}"] += 1
        return retry

    increment.counts = counts
    Retry.increment = increment
    return counts


def evaluation():
    """A 5-network evaluation: 13 metrics at the last step."""
    from mim4dd.evaluate import EvalResult

    return EvalResult(test_accuracies=[0.30, 0.31, 0.32, 0.33, 0.34],
                      val_accuracies=[0.30, 0.30, 0.31, 0.31, 0.32], lr=0.01)


def one_trial(client, ctx: dict, trial) -> dict:
    """The trainable's MLflow calls for one trial, flushes timed; what was acknowledged."""
    from orchestrator.trial_run import TrialRun

    n, run, phase = ctx["iterations"], None, "open"
    out = {"run_id": None, "flush_s": [], "errors": [], "acked_until": 0, "eval": False,
           "artifact": False, "start": time.time()}
    try:
        run = TrialRun.open(client, ctx["parent"], ctx["sweep"], trial)
        out["run_id"] = run.run_id
        for step in range(1, n + 1):
            run.log_iteration(step, {name: 1.0 / (step + i) for i, name in enumerate(METRICS)})
            if step % ctx["flush_every"] == 0:
                phase, started = f"flush at step {step}", time.perf_counter()
                run.flush()
                out["flush_s"].append(time.perf_counter() - started)
                out["acked_until"] = step
        phase = "log_evaluation"
        run.log_evaluation(evaluation())  # at step 0; also flushes any steps left
        out["acked_until"], out["eval"], phase = n, True, "log_outputs"
        run.log_outputs(Path(ctx["synset"]), Path(ctx["results"]))
        out["artifact"], phase = True, "finish"
        run.finish()
    except Exception as exc:  # noqa: BLE001 - as the trainable: end the run FAILED; no retry
        out["errors"].append(f"{phase}: {first_line(exc)}")
        try:
            if run is not None:
                run.fail(first_line(exc))
        except Exception as again:  # noqa: BLE001 - reported like the first error
            out["errors"].append(f"fail: {first_line(again)}")
    out["end"] = time.time()
    return out


def trial_process(ctx: dict, trials: list, gate) -> dict:
    """A Ray task: connect per trial (as each trial process does), wait at the gate, run the
    trials (one thread each); report them with this process's retries, CPU and peak RSS."""
    import ray

    from orchestrator.tracking import connect

    from orchestrator.retrying import retried

    counts = count_retries()
    before, ours_before = Counter(counts), Counter(retried)
    clients = [connect(ctx["uri"]) for _ in trials]
    ray.get(gate.arrive.remote())
    usage, results = resource.getrusage(resource.RUSAGE_SELF), [{} for _ in trials]

    def work(i: int) -> None:
        results[i] = one_trial(clients[i], ctx, trials[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(trials))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    ours = {f"{TRACKING_HOST}: RetryingClient.{m}": n for m, n in (retried - ours_before).items()}
    return {"trials": results, "retries": {**dict(counts - before), **ours},
            "cpu_s": after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, "maxrss_mb": after.ru_maxrss / 1024}


class Gate:
    """A Ray actor: each party's `arrive` returns once all parties have arrived."""

    def __init__(self, parties: int):
        self.parties, self.event = parties, asyncio.Event()

    async def arrive(self) -> None:
        self.parties -= 1
        if self.parties == 0:
            self.event.set()
        await asyncio.wait_for(self.event.wait(), 900)


class Server:
    """`mlflow server` on a fresh PostgreSQL database, proxied artifacts; `stop` drops both."""

    def __init__(self, folder: Path, workers: int):
        import psycopg
        import requests

        self.db = f"mim4dd_bench_{uuid.uuid4().hex[:10]}"
        self.admin = psycopg.connect(f"{PG}/postgres", autocommit=True)
        self.admin.cursor().execute(f"CREATE DATABASE {self.db}")
        with socket.socket() as s:
            s.bind((TRACKING_HOST, 0))
            port = s.getsockname()[1]
        self.log_path = folder / "server.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(  # its own process group: its workers are found by it
            [sys.executable, "-m", "mlflow", "server", "--host", TRACKING_HOST, "--port",
             str(port), "--backend-store-uri", f"{PG}/{self.db}", "--artifacts-destination",
             str(folder / "artifacts"), "--serve-artifacts", "--workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.uri, deadline = f"http://{TRACKING_HOST}:{port}", time.time() + 300
        while True:
            with suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=5).ok:
                    break
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {self.log_path}")
            time.sleep(1)

    def usage(self) -> tuple[float, float]:
        """(CPU seconds, sum of peak RSS in MiB) of the server's live processes."""
        cpu = peak = 0.0
        for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.proc.pid:  # in the server's process group
                    cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                    peak += int(re.search(r"VmHWM:\s+(\d+)", (entry / "status").read_text())[1])
            except (OSError, IndexError, TypeError):
                pass
        return cpu, peak / 1024

    def statuses(self, offset: int) -> Counter:
        """Non-2xx responses in the server's access log after byte `offset`."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return Counter(f"HTTP {c}" for c in re.findall(r'HTTP/1\.1" (\d{3})', text)
                       if c[0] != "2")

    def deadlocks(self) -> int:
        """PostgreSQL's deadlock count for the database (the server retries those itself)."""
        cursor = self.admin.cursor()
        cursor.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = %s", (self.db,))
        return cursor.fetchone()[0]

    def stop(self) -> None:
        self.proc.terminate()  # uvicorn stops its workers on SIGTERM
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()
        self.admin.cursor().execute(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        self.admin.close()


def mem_available_mb() -> int:
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) // 1024


def check_rows(db, experiment_id: str, trials: list[dict], n: int) -> dict:
    """Count the rows per (run, metric, step) in the store's database against what each trial
    logged: lost = acknowledged but absent, missing = never acknowledged and absent."""
    cursor = db.cursor()
    cursor.execute("SELECT m.run_uuid, m.key, m.step FROM metrics m JOIN runs r ON r.run_uuid = "
                   f"m.run_uuid WHERE r.experiment_id = {int(experiment_id)}")
    found, lost, missing = Counter(cursor.fetchall()), 0, 0
    for t in trials:
        expected = [(key, step, step <= t["acked_until"]) for key in METRICS
                    for step in range(1, n + 1)]
        expected += [(key, 0, t["eval"]) for key in evaluation().metrics()]
        absent = [acked for key, step, acked in expected if not found[(t["run_id"], key, step)]]
        lost, missing = lost + sum(absent), missing + len(absent) - sum(absent)
    return {"rows": sum(found.values()), "duplicated": sum(c - 1 for c in found.values()),
            "lost": lost, "missing": missing}


def run_config(store: str, k: int, args, folder: Path, server: Server | None, remote, gate_cls,
               memory: dict) -> dict:
    import psycopg
    import ray

    from mim4dd.config import Config
    from orchestrator.expand import Trial
    from orchestrator.tracking import child_runs, connect, ensure_experiment, open_sweep_run

    uri = server.uri if server else f"sqlite:///{folder / f'sqlite-k{k}' / 'mlflow.db'}"
    client, sweep = connect(uri), f"bench-tracking-{store}-k{k}"
    parent = open_sweep_run(client, ensure_experiment(client, sweep, uri), sweep, {})
    trials = [Trial(f"seed={i}", {"seed": i}, Config(dataset="digits", iterations=args.iterations,
                                                       lam=0.8, seed=i)) for i in range(k)]
    procs = min(k, args.max_procs)
    ctx = {"uri": uri, "parent": parent.info.run_id, "sweep": sweep, "iterations": args.iterations,
           "flush_every": args.flush_every, "synset": str(folder / "out" / "synset"),
           "results": str(folder / "out" / "results.json")}
    gate = gate_cls.remote(procs)
    server_cpu, log_at = (server.usage()[0], server.log_path.stat().st_size) if server else (0, 0)
    deadlocks = server.deadlocks() if server else 0
    memory["low"] = mem_available_mb()
    outs = ray.get([remote.remote(ctx, trials[i::procs], gate) for i in range(procs)])
    ray.kill(gate)
    done = [t for out in outs for t in out["trials"]]
    wall = max(t["end"] for t in done) - min(t["start"] for t in done)
    db = psycopg.connect(f"{PG}/{server.db}") if server else sqlite3.connect(uri[10:])
    check = check_rows(db, parent.info.experiment_id, done, args.iterations)
    db.close()
    runs = Counter(r.info.run_name for r in child_runs(client, parent))
    artifacts = sum({"results.json", "synset/set.bin"} <= {
        f.path for path in (None, "synset") for f in client.list_artifacts(t["run_id"], path)}
        for t in done if t["run_id"])
    retries = sum((Counter(o["retries"]) for o in outs), Counter())
    return {
        "store": store, "k": k, "procs": procs, "threads": -(-k // procs), "wall_s": wall,
        **check, "rows_per_s": check["rows"] / wall,
        "flush_ms": sorted(s * 1000 for t in done for s in t["flush_s"]),
        "errors": Counter(e for t in done for e in t["errors"]),
        "failed_trials": sum(bool(t["errors"]) for t in done),
        "retries": {c: n for c, n in retries.items() if c.startswith(TRACKING_HOST)},
        "retries_elsewhere": {c: n for c, n in retries.items() if not c.startswith(TRACKING_HOST)},
        "server_statuses": server.statuses(log_at) if server else {},
        "runs": sum(runs.values()), "keys": len(runs),
        "artifacts_ok": artifacts, "cpu_trials_s": sum(o["cpu_s"] for o in outs),
        "cpu_server_s": server.usage()[0] - server_cpu if server else 0.0,
        "trial_proc_peak_rss_mb": max(o["maxrss_mb"] for o in outs),
        "mem_available_low_mb": memory["low"],
        "pg_deadlocks": server.deadlocks() - deadlocks if server else 0,
    }


def pct(values: list[float], q: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.0f}" if values else "-"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1]:.0f}"


def report(results: list[dict]) -> None:
    headers = ["store", "K", "procs x thr", "rows", "wall s", "rows/s", "flush p50 ms",
               "flush p99 ms", "errors", "retries", "lost", "duplicated", "unacked missing",
               "runs/keys/K", "artifacts", "CPU s trials / server"]
    cells = [[r["store"], str(r["k"]), f"{r['procs']} x {r['threads']}", str(r["rows"]),
              f"{r['wall_s']:.1f}", f"{r['rows_per_s']:.0f}", pct(r["flush_ms"], 50),
              pct(r["flush_ms"], 99), str(sum(r["errors"].values())),
              str(sum(r["retries"].values())), str(r["lost"]), str(r["duplicated"]),
              str(r["missing"]), f"{r['runs']}/{r['keys']}/{r['k']}", f"{r['artifacts_ok']}/{r['k']}",
              f"{r['cpu_trials_s']:.1f} / {r['cpu_server_s']:.1f}"] for r in results]
    print_table("MLflow tracking under K concurrent trials", headers, cells, width=200)
    for r in results:
        notes = [f"{n}x {text}" for text, n in r["errors"].most_common(5)]
        if r["retries"]:
            notes.append(f"retries {r['retries']}")
        if r["retries_elsewhere"]:
            notes.append(f"retries to other hosts (MLflow telemetry; no network here) "
                         f"{r['retries_elsewhere']}")
        if r["server_statuses"]:
            notes.append(f"server non-2xx {dict(r['server_statuses'])}")
        if r["store"] == "server":
            notes.append(f"PostgreSQL deadlocks {r['pg_deadlocks']}")
        print(f"{r['store']} K={r['k']}: failed trials {r['failed_trials']}; trial process "
              f"peak RSS "
              f"{r['trial_proc_peak_rss_mb']:.0f} MiB; lowest MemAvailable "
              f"{r['mem_available_low_mb']} MiB. {'; '.join(notes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 16, 64], help="concurrent trials")
    parser.add_argument("--iterations", type=int, default=300, help="steps per trial (N)")
    parser.add_argument("--flush-every", type=int, default=50, help="checkpoint_every")
    parser.add_argument("--max-procs", type=int, default=16, help="most trial processes")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "server"],
                        choices=["sqlite", "server"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if min(args.iterations, args.flush_every, args.max_procs, args.server_workers, *args.k) < 1:
        parser.error("all counts must be >= 1")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        os.environ.pop(name, None)
    import mlflow
    import ray

    from orchestrator.tune_run import RAY_ENV, start_local

    started, memory = time.perf_counter(), {"low": mem_available_mb()}

    def watch() -> None:  # the lowest MemAvailable during each configuration
        while True:
            memory["low"] = min(memory["low"], mem_available_mb())
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    print(f"{os.cpu_count()} CPUs | {platform.processor() or platform.machine()} | python "
          f"{platform.python_version()} | mlflow {mlflow.__version__} | ray {ray.__version__} | "
          f"load average {os.getloadavg()[0]:.1f} | MemAvailable {mem_available_mb()} MiB")
    print(f"N = {args.iterations} iterations x 8 metrics per trial, flush every "
          f"{args.flush_every}; at most {args.max_procs} trial processes; mlflow server: "
          f"{args.server_workers} uvicorn workers, PostgreSQL, proxied artifacts", flush=True)
    results, server_peak = [], 0.0
    with tempfile.TemporaryDirectory(prefix="mim4dd-bench-tracking-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        (folder / "out" / "synset").mkdir(parents=True)
        (folder / "out" / "synset" / "set.bin").write_bytes(os.urandom(4096))
        (folder / "out" / "results.json").write_text(json.dumps({"bench": True}))
        server = None
        if "server" in args.stores:
            server = Server(folder, args.server_workers)
            stack.callback(server.stop)
            print(f"mlflow server at {server.uri}, database {server.db}", flush=True)
        start_local(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": dict(RAY_ENV)},
                    _system_config={"num_workers_soft_limit": args.max_procs})
        stack.callback(ray.shutdown)
        remote = ray.remote(num_cpus=0, max_retries=0)(trial_process)
        gate_cls = ray.remote(num_cpus=0)(Gate)
        for i, k in enumerate(args.k):
            for store in args.stores if i % 2 == 0 else args.stores[::-1]:
                print(f"{store}, K = {k} (load average {os.getloadavg()[0]:.1f})", flush=True)
                results.append(run_config(store, k, args, folder, server if store == "server"
                                          else None, remote, gate_cls, memory))
                print(f"  {results[-1]['wall_s']:.1f} s, {results[-1]['rows']} rows, errors "
                      f"{sum(results[-1]['errors'].values())}", flush=True)
        server_peak = server.usage()[1] if server else 0.0
    print()
    report(results)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"mlflow server peak RSS (sum over its processes) {server_peak:.0f} MiB; driver user "
          f"{usage.ru_utime:.1f} s, system {usage.ru_stime:.1f} s; total run time "
          f"{time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
