"""Orchestration overhead: the same K trials run by the engine directly and by the sweep service.

The trials are a grid lam [0, 0.8] x seed [0 .. --seeds - 1] (K = 4 by default) with tiny
budgets on scikit-learn's offline `digits` data set, so that the fixed costs of the service
are visible next to the compute. They run:

  direct   `run_experiment(config)` for each trial config, one after another, in this
           process, with `torch.set_num_threads(1)` (what the service gives a 1-CPU trial).
  service  `orchestrator.service.launch(spec)` of the equivalent sweep: max_concurrent 1 and
           resources.cpu 1, so that concurrency cannot hide overhead; a fresh MIM4DD_HOME (an
           empty embedded MLflow store) in a temporary folder; Ray started and stopped by the
           service itself.
  service x N (with --concurrent N): the same sweep with max_concurrent N, in another fresh
           MIM4DD_HOME; with N free cores and trials long enough to outweigh the fixed
           start-up, its ratio can drop below 1.

The trial configs of the direct loop are taken from the service's own spec (`spec.trials()`),
so both paths run identical engine configs. Where the service's time goes is measured in this
process by wrapping, for the duration of the launch only, the functions `launch` calls (Ray
start and shutdown, MLflow store creation, the expert stage, Tune's fit, the aggregation); the
trial bodies are measured by the start and end times of the trials' MLflow child runs. The
service itself is not modified.

    python benchmarks/bench_orchestration.py --concurrent 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from _common import print_table

from mim4dd.experiment import run_experiment

ENV_UNSET = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MIM4DD_RAY_STORAGE")  # local, embedded


def make_spec(name: str, args: argparse.Namespace, concurrent: int) -> dict[str, Any]:
    return {
        "name": name,
        "engine": {
            "dataset": "digits", "ipc": 1, "iterations": args.trials_iterations,
            "batch_real": args.batch_real, "device": "cpu",
            "model": {"width": args.width},
            "eval": {"epochs": args.eval_epochs, "num_nets": args.num_nets},
        },
        "grid": {"lam": [0, 0.8], "seed": list(range(args.seeds))},
        "resources": {"cpu": 1},
        "max_concurrent": concurrent,
        "retries": 0,  # a failure shows up as one, instead of as a slower trial
    }


@contextmanager
def timed(module: Any, name: str, spent: dict[str, float], label: str):
    """Replace `module.name` by a wrapper adding its wall time to `spent[label]`."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - started

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_direct(configs: list) -> dict[str, Any]:
    torch.set_num_threads(1)
    per_trial = []
    started = time.perf_counter()
    for config in configs:
        trial_started = time.perf_counter()
        result = run_experiment(config)
        per_trial.append(time.perf_counter() - trial_started)
        print(f"  direct lam={config.lam:g} seed={config.seed}: {per_trial[-1]:.2f} s, "
              f"{result.evaluation}", flush=True)
    return {"wall_s": time.perf_counter() - started, "per_trial_s": per_trial}


def run_service(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """One launch in a fresh MIM4DD_HOME, with the launch's parts timed."""
    import ray
    from mlflow import MlflowClient

    from orchestrator import experts, service, tracking, tune_run
    from orchestrator.spec import parse_spec

    spec = parse_spec(spec_dict)
    spent: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mim4dd-bench-") as home:
        os.environ[tracking.HOME_ENV] = home
        with ExitStack() as stack:
            for module, name, label in (
                (tune_run, "_init_ray", "ray_start"),
                (ray, "shutdown", "ray_shutdown"),
                (tracking, "connect", "mlflow_store"),
                (tracking, "ensure_experiment", "mlflow_store"),
                (experts, "prepare", "expert_stage"),
                (service, "run_tune", "tune_fit"),
                (service, "_aggregate", "aggregate"),
            ):
                stack.enter_context(timed(module, name, spent, label))
            started = time.perf_counter()
            outcome = service.launch(spec, progress=False)
            wall = time.perf_counter() - started
        client = MlflowClient(outcome.tracking_uri)
        parent = tracking.find_sweep_run(client, spec.name)
        children = tracking.child_runs(client, parent) if parent else []
        trial_s = [(r.info.end_time - r.info.start_time) / 1000 for r in children
                   if r.info.end_time]
    if outcome.status != "FINISHED" or outcome.failed:
        raise SystemExit(f"the sweep did not finish: {outcome.status}, failed: {outcome.failed}")
    return {"wall_s": wall, "parts_s": spent, "other_driver_s": wall - sum(spent.values()),
            "trial_runs_s": trial_s, "max_concurrent": spec.max_concurrent}


def breakdown(service_run: dict[str, Any], direct: dict[str, Any], k: int) -> list[list[str]]:
    """Rows (part, seconds, note) for one service launch against the direct loop."""
    parts, wall = service_run["parts_s"], service_run["wall_s"]
    tune_s = parts.get("tune_fit", 0.0)
    fixed = wall - tune_s  # everything the launch did outside Tune's fit
    trials = service_run["trial_runs_s"]
    rows = [
        ["Ray start (ray.init, local cluster)", parts.get("ray_start", 0.0), "fixed"],
        ["Ray shutdown", parts.get("ray_shutdown", 0.0), "fixed"],
        ["MLflow store + experiment (fresh sqlite)", parts.get("mlflow_store", 0.0), "fixed"],
        ["expert stage (none for DM)", parts.get("expert_stage", 0.0), "fixed"],
        ["aggregate + report", parts.get("aggregate", 0.0), "fixed"],
        ["other driver bookkeeping", service_run["other_driver_s"],
         "fixed: parent run, spec, accounting"],
        ["fixed start-up, total", fixed, "launch outside Tune's fit"],
        ["Tune fit", tune_s, f"{k} trials"],
    ]
    if service_run["max_concurrent"] == 1:  # with overlapping trials these sums mean little
        rows += [
            ["  trial bodies (MLflow child runs)", sum(trials), "sum over trials"],
            ["  Tune scheduling + workers", tune_s - sum(trials), "fit - trial bodies"],
            ["per-trial overhead", (wall - direct["wall_s"] - fixed) / k,
             "(service - direct - fixed) / K"],
            ["  inside the trial", (sum(trials) - direct["wall_s"]) / k,
             "(trial bodies - direct) / K"],
        ]
    else:
        rows.append(["  longest trial body (MLflow child run)", max(trials, default=0.0),
                     "trials overlap"])
    return [[name, f"{value:.2f}", note] for name, value, note in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials-iterations", type=int, default=20,
                        help="distillation iterations per trial")
    parser.add_argument("--eval-epochs", type=int, default=20, help="epochs per eval network")
    parser.add_argument("--width", type=int, default=16, help="ConvNet channels")
    parser.add_argument("--batch-real", type=int, default=32, help="real images per class")
    parser.add_argument("--num-nets", type=int, default=2, help="networks per evaluation")
    parser.add_argument("--seeds", type=int, default=2, help="K = 2 lams x this many seeds")
    parser.add_argument("--concurrent", type=int, default=0,
                        help="also launch with this max_concurrent (0: skip)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if min(args.trials_iterations, args.eval_epochs, args.width, args.seeds) < 1:
        parser.error("--trials-iterations, --eval-epochs, --width and --seeds must be >= 1")
    for name in ENV_UNSET:
        os.environ.pop(name, None)

    started = time.perf_counter()
    from orchestrator.spec import parse_spec  # ray, mlflow and the service come later

    spec = make_spec("bench-orchestration", args, 1)
    configs = [t.config for t in parse_spec(spec).trials()]
    k = len(configs)
    print(f"torch {torch.__version__} | {os.cpu_count()} CPUs | "
          f"{platform.processor() or platform.machine()} | python {platform.python_version()} | "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"K = {k} trials on digits, ipc 1, {args.trials_iterations} iterations, batch_real "
          f"{args.batch_real}, width {args.width}, eval {args.num_nets} nets x "
          f"{args.eval_epochs} epochs; 1 torch thread per trial")

    print("direct: run_experiment per trial, one after another", flush=True)
    direct = run_direct(configs)
    imports_started = time.perf_counter()
    import mlflow  # noqa: F401  imports the service pays once per process; not in its time
    import ray  # noqa: F401

    import orchestrator.service  # noqa: F401
    imports_s = time.perf_counter() - imports_started

    runs = {}
    for concurrent in [1] + ([args.concurrent] if args.concurrent else []):
        print(f"service: launch, max_concurrent {concurrent}, cpu 1, fresh MIM4DD_HOME "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        runs[concurrent] = run_service(make_spec(f"bench-orchestration-c{concurrent}",
                                                 args, concurrent))
        print(f"  {runs[concurrent]['wall_s']:.2f} s", flush=True)

    print()
    rows = [["direct loop", f"{direct['wall_s']:.2f}", "1.00x",
             f"{direct['wall_s'] / k:.2f}"]]
    for concurrent, run in runs.items():
        rows.append([f"service, max_concurrent {concurrent}", f"{run['wall_s']:.2f}",
                     f"{run['wall_s'] / direct['wall_s']:.2f}x", f"{run['wall_s'] / k:.2f}"])
    print_table(f"{k} trials: wall time", ["path", "wall s", "ratio to direct", "s per trial"],
                rows)
    for concurrent, run in runs.items():
        print_table(f"service, max_concurrent {concurrent}: where the time goes",
                    ["part", "s", "what"], breakdown(run, direct, k))
    print(f"direct per trial: {', '.join(f'{s:.2f}' for s in direct['per_trial_s'])} s; "
          f"imports of mlflow + ray + orchestrator.service in this process: {imports_s:.2f} s "
          f"(not counted above); total run time {time.perf_counter() - started:.0f} s; "
          f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "k": k,
                       "direct": direct, "imports_s": imports_s,
                       "service": {str(c): r for c, r in runs.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
