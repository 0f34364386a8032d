"""Service overhead per step: one trial's distillation step rate through the sweep service
against the same config in the bare engine, interleaved.

Both run digits, IPC 1, a width-8 ConvNet (a CPU step of a few ms to tens of ms, where a fixed
cost per step shows). The step rate is (N - 1) steps over the time from iteration 1 to
iteration N:

  engine   `Distiller.run` in this process with one torch thread (a 1-CPU trial's share);
           times taken in its callback.
  service  `orchestrator.service.launch` of a one-trial sweep (resources.cpu 1) on a local Ray
           cluster started once, a fresh embedded MLflow store per run; times are the MLflow
           timestamps of the trial's per-step `loss` metric (milliseconds).

Each pair runs the engine and then the service at every `--report-every-s` value, so the
machine's load drifts over all of them alike. Ratios below 1 are the service's overhead.

    python benchmarks/bench_service_overhead.py --pairs 3 --report-every-s 0 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import prepare, print_table

from mim4dd.config import Config
from mim4dd.data import load_for
from mim4dd.distill import DistillCallback, Distiller

ENGINE = {"dataset": "digits", "ipc": 1, "model": {"width": 8}, "batch_real": 32,
          "eval": {"num_nets": 1, "epochs": 1}}


class _Clock(DistillCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        self.times.append(time.perf_counter())


def engine_rate(config: Config) -> float:
    clock = _Clock()
    Distiller(config, load_for(config)).run(callback=clock)
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def service_rate(iterations: int, report_every_s: float, name: str, folder: Path) -> float:
    from mlflow import MlflowClient

    from orchestrator import service, tracking
    from orchestrator.spec import load_spec

    os.environ[tracking.HOME_ENV] = str(folder / name)
    spec = {"name": name, "engine": {**ENGINE, "iterations": iterations},
            "grid": {"seed": [0]}, "checkpoint_every": iterations,
            "report_every_s": report_every_s, "resources": {"cpu": 1}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    outcome = service.launch(load_spec(path), progress=False)
    assert outcome.status == "FINISHED", outcome.failed
    client = MlflowClient(tracking.resolve_tracking_uri())
    [run] = tracking.child_runs(client, tracking.find_sweep_run(client, name))
    stamps = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss"))
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--report-every-s", type=float, nargs="+", default=[0.0, 1.0])
    args = parser.parse_args()
    prepare("cpu", 1)
    from orchestrator import tune_run

    tune_run.start_local(num_cpus=2, log_to_driver=False)
    config = Config.model_validate({**ENGINE, "iterations": args.iterations})
    engine: list[float] = []
    service: dict[float, list[float]] = {r: [] for r in args.report_every_s}
    with tempfile.TemporaryDirectory(prefix="mim4dd-overhead-") as tmp:
        for pair in range(args.pairs):
            engine.append(engine_rate(config))
            for every in args.report_every_s:
                name = f"overhead-{pair}-{str(every).replace('.', '_')}"
                service[every].append(service_rate(args.iterations, every, name, Path(tmp)))
            print(f"pair {pair}: engine {engine[-1]:.1f} steps/s; service "
                  + ", ".join(f"{r:g} s: {v[-1]:.1f}" for r, v in service.items()), flush=True)
    rows = [["engine", "-", f"{statistics.mean(engine):.1f}", "1.00", "-"]]
    for every, rates in service.items():
        ratios = [s / e for s, e in zip(rates, engine, strict=True)]
        rows.append(["service", f"{every:g}", f"{statistics.mean(rates):.1f}",
                     f"{statistics.mean(ratios):.2f}",
                     " ".join(f"{r:.2f}" for r in ratios)])
    ms = 1000 / statistics.mean(engine)
    print_table(f"step rate, digits IPC 1 width 8, {args.iterations} iterations "
                f"({ms:.1f} ms per engine step), {args.pairs} pairs, torch {torch.__version__}",
                ["path", "report every (s)", "steps/s", "ratio to engine", "per pair"], rows)


if __name__ == "__main__":
    main()
