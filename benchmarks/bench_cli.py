"""Read commands on a store of many finished trials: wall time and peak RSS per command.

Builds (once, in `--store`, kept for the next run) an embedded store holding one sweep of
`--trials` finished trials: digits, IPC 1, width 8, 2 iterations and a 1-network, 1-epoch
evaluation each, launched by the service itself. Then runs each read command `--repeats` times
as its own process (`python -m orchestrator.cli ...`, as a user's shell would) and prints the
median wall time and the peak RSS of one run (the process's own `ru_maxrss`).

    python benchmarks/bench_cli.py --trials 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import print_table

SWEEP = "cli-bench"
ROOT = Path(__file__).resolve().parents[1]


def build_store(home: Path, trials: int) -> None:
    """A sweep of `trials` finished tiny trials in the embedded store at `home`."""
    from orchestrator import service, tracking
    from orchestrator.spec import load_spec

    os.environ[tracking.HOME_ENV] = str(home)
    spec = {"name": SWEEP, "max_trials": trials,
            "engine": {"dataset": "digits", "ipc": 1, "model": {"width": 8}, "iterations": 2,
                       "batch_real": 16, "eval": {"num_nets": 1, "epochs": 1}},
            "grid": {"seed": list(range(trials))}, "max_concurrent": 2}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{SWEEP}.yaml"
        path.write_text(yaml.safe_dump(spec))
        outcome = service.launch(load_spec(path), progress=False)
    assert outcome.status == "FINISHED", outcome.failed


def timed(args: list[str], home: Path) -> float:
    """Wall seconds of one `python -m orchestrator.cli ARGS` process."""
    env = {**os.environ, "MIM4DD_HOME": str(home)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # `stop` answers "no launch running" with 1
        raise RuntimeError(f"{args}: {done.stderr}")
    return time.perf_counter() - started


def peak_rss_mb(args: list[str], home: Path) -> float:
    """Peak RSS of one run of the command: a child Python runs it and prints its VmHWM
    (ru_maxrss would carry this process's peak across fork and exec)."""
    code = ("import re, runpy, sys; sys.argv = ['mim4dd-sweep', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('orchestrator.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "status = open('/proc/self/status').read()\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', status)[1], file=sys.stderr)")
    env = {**os.environ, "MIM4DD_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", type=Path,
                        default=Path(tempfile.gettempdir()) / "mim4dd-bench-cli")
    args = parser.parse_args()
    home = args.store / f"{args.trials}-trials"
    if not (home / "mlflow.db").exists():
        print(f"building a store of {args.trials} finished trials in {home} ...", flush=True)
        build_store(home, args.trials)
    commands = [["--help"], ["--version"], ["list"], ["status", SWEEP], ["report", SWEEP],
                ["report", SWEEP, "--format", "csv"], ["stop", SWEEP]]
    rows = []
    for command in commands:
        walls = [timed(command, home) for _ in range(args.repeats)]
        rows.append([" ".join(command), f"{statistics.median(walls):.2f}",
                     " ".join(f"{w:.2f}" for w in walls), f"{peak_rss_mb(command, home):.0f}"])
    print_table(f"mim4dd-sweep read commands, one sweep of {args.trials} finished trials",
                ["command", "median wall (s)", "runs (s)", "peak RSS (MB)"], rows)


if __name__ == "__main__":
    main()
