"""This checkout against an earlier commit: run one benchmark script from both, alternately.

A worktree of REV is made in a temporary folder; then, `--rounds` times, the benchmark runs
once from REV and once from this checkout (order alternating), each in its own process with
its own tree first on PYTHONPATH. The benchmark must accept `--json FILE` and write `rows`
with `median_s` and `cpu_median_s` (bench_bases.py and bench_distill.py do). Rows are
matched by their other fields; the table gives each side's median over rounds and the
ratio now / REV, so a change that slows a path shows up next to the ones it speeds up.

    python benchmarks/bench_against.py 58374bd bench_bases.py --rounds 2 -- --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import print_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TIMES = ("median_s", "cpu_median_s")
# Measured fields; every other field of a row names what was measured.
MEASURED = {*TIMES, "min_s", "max_s", "ratio", "cpu_ratio", "steps"}


def run_once(tree: Path, script: str, extra: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "benchmarks" / script), *extra, "--json", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["rows"]


def key(row: dict) -> tuple:
    return tuple((k, v) for k, v in sorted(row.items()) if k not in MEASURED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the earlier commit (any git revision)")
    parser.add_argument("script", help="benchmark script in benchmarks/, e.g. bench_bases.py")
    parser.add_argument("--rounds", type=int, default=2)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # the script's own arguments
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])

    times: dict[tuple, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_against_") as folder:
        before = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before),
                        args.rev], check=True, capture_output=True)
        try:
            sides = [("rev", before), ("now", REPO)]
            for i in range(args.rounds):
                for side, tree in sides if i % 2 == 0 else sides[::-1]:
                    print(f"round {i + 1}: {side} ...", flush=True)
                    for row in run_once(tree, args.script, extra, Path(folder) / "out.json"):
                        times.setdefault(key(row), {}).setdefault(side, []).append(row)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(before)], check=False, capture_output=True)

    headers = ["row", f"{args.rev} s", "now s", "now / rev", f"{args.rev} CPU s", "now CPU s",
               "now / rev (CPU)"]
    cells = []
    for row_key, sides in times.items():
        if set(sides) != {"rev", "now"}:
            continue
        med = {side: [statistics.median(r[t] for r in sides[side]) for t in TIMES]
               for side in sides}
        cells.append([" ".join(f"{k}={v}" for k, v in row_key),
                      f"{med['rev'][0]:.3f}", f"{med['now'][0]:.3f}",
                      f"{med['now'][0] / med['rev'][0]:.2f}", f"{med['rev'][1]:.3f}",
                      f"{med['now'][1]:.3f}", f"{med['now'][1] / med['rev'][1]:.2f}"])
    print_table(f"{args.script}: this checkout against {args.rev} ({args.rounds} rounds)",
                headers, cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
