"""Seconds per distillation iteration of each base (dm, dc, mtt, cafe), at lam = 0 and lam > 0.

On real FashionMNIST (1 x 28 x 28, offline) at one IPC, eight `Distiller`s are built on the same
data: base dm, dc, mtt and cafe, each with ``lam=0`` and ``lam=--lam`` (0.8 by default). Each takes
one warm-up step, then ``--steps`` timed steps. The eight are timed *interleaved* (all eight in one
order, then in the reverse order, ...), so that load from other processes on a shared machine
falls on all alike; the table reports the median seconds per iteration of each and its ratio
to dm at lam = 0 measured in the same run.

* dc uses the engine's default outer/inner loop for the IPC (printed); its step includes the
  inner loop, i.e. training the matching network `inner_loop` epochs on the synthetic set;
  cafe trains its network the same way (10 epochs between updates by default).
* mtt needs an expert buffer: a small one is trained first in a temporary folder (``--experts``
  experts x ``--expert-epochs`` epochs on the whole training split) and its build time is
  reported apart. The trajectory's values do not change a step's cost, only its shapes do.
  mtt runs with syn_steps 20 and expert_epochs 2 (the defaults); max_start_epoch is cut to fit
  the short trajectories.

    python benchmarks/bench_bases.py --steps 3 --batch-real 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from _common import prepare, print_table, time_interleaved

from mim4dd.config import Config, ModelConfig
from mim4dd.data import load_dataset
from mim4dd.distill import Distiller
from mim4dd.experts import train_experts

BASES = ["dm", "dc", "mtt", "cafe"]


@dataclass
class Row:
    base: str
    lam: float
    median_s: float  # wall clock
    min_s: float
    max_s: float
    cpu_median_s: float  # CPU time of this process (all threads), less sensitive to other load
    steps: int
    ratio: float  # median / median of dm at lam = 0, wall clock
    cpu_ratio: float  # the same on CPU time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--batch-real", type=int, default=64, help="real images per class")
    parser.add_argument("--width", type=int, default=32, help="ConvNet channels")
    parser.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    parser.add_argument("--lam", type=float, default=0.8, help="MIM weight compared with 0")
    parser.add_argument("--experts", type=int, default=2, help="experts in mtt's buffer")
    parser.add_argument("--expert-epochs", type=int, default=2,
                        help="epochs each expert trains (>= 2, mtt's expert_epochs)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lam <= 0 or args.experts < 1 or args.expert_epochs < 2:
        parser.error("need --steps >= 1, --lam > 0, --experts >= 1 and --expert-epochs >= 2")
    device = prepare(args.device, args.threads)

    print(f"FashionMNIST, IPC {args.ipc}, batch_real {args.batch_real}, ConvNet-3 width "
          f"{args.width}; {args.steps} timed steps after 1 warm-up, "
          f"{2 * len(BASES)} configurations interleaved")
    data = load_dataset("FashionMNIST")
    common = {
        "dataset": "FashionMNIST", "ipc": args.ipc, "batch_real": args.batch_real,
        "device": args.device, "model": ModelConfig(width=args.width),
        "iterations": args.steps + 1,
    }
    expert_epochs = 2
    mtt_settings = {
        "num_experts": args.experts, "expert_train_epochs": args.expert_epochs,
        "expert_epochs": expert_epochs, "max_start_epoch": args.expert_epochs - expert_epochs + 1,
    }

    with tempfile.TemporaryDirectory(prefix="bench_bases_experts_") as folder:
        expert_config = Config(base="mtt", lam=0.0, expert_dir=folder, **mtt_settings, **common)
        print(f"building the mtt expert buffer: {args.experts} experts x {args.expert_epochs} "
              f"epochs on {len(data.train)} training images ...", flush=True)
        started, started_cpu = time.perf_counter(), time.process_time()
        train_experts(expert_config, data=data)
        build_s, build_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
        print(f"  expert buffer built in {build_s:.1f} s wall, {build_cpu_s:.1f} s CPU", flush=True)

        configs = []
        for base in BASES:
            extra = {"expert_dir": folder, **mtt_settings} if base == "mtt" else {}
            for lam in (0.0, args.lam):
                configs.append(Config(base=base, lam=lam, **extra, **common))
        distillers = [Distiller(config, data) for config in configs]
        dc = distillers[BASES.index("dc") * 2].objective
        dc_note = (f"dc: outer_loop {dc.outer_loop}, inner_loop {dc.inner_loop} (engine defaults "
                   f"at IPC {args.ipc}); a dc step includes the inner loop: {dc.inner_loop} "
                   "epochs of network training on the synthetic set, except the step just "
                   "before a network re-initialisation (warm-up is step 0, which initialises)")
        mtt = configs[BASES.index("mtt") * 2]
        mtt_note = (f"mtt: syn_steps {mtt.syn_steps}, expert_epochs {mtt.expert_epochs}, "
                    f"max_start_epoch {mtt.max_start_epoch}, student batch "
                    f"{mtt.batch_syn or 'all ' + str(10 * args.ipc)} images")
        print(dc_note)
        print(mtt_note, flush=True)
        wall, cpu = time_interleaved(distillers, args.steps, device)
        del distillers

    reference, cpu_reference = statistics.median(wall[0]), statistics.median(cpu[0])
    rows = [
        Row(config.base, config.lam, statistics.median(w), min(w), max(w),
            statistics.median(c), len(w), statistics.median(w) / reference,
            statistics.median(c) / cpu_reference)
        for config, w, c in zip(configs, wall, cpu, strict=True)
    ]
    print()
    headers = ["base", "lam", "s/iter (median)", "min", "max", "CPU s/iter",
               "ratio to dm lam=0", "ratio (CPU)"]
    cells = [
        [r.base, f"{r.lam:g}", f"{r.median_s:.3f}", f"{r.min_s:.3f}", f"{r.max_s:.3f}",
         f"{r.cpu_median_s:.3f}", f"{r.ratio:.2f}x", f"{r.cpu_ratio:.2f}x"]
        for r in rows
    ]
    print_table(f"s per iteration (median of {args.steps}), FashionMNIST IPC {args.ipc}",
                headers, cells)
    print(f"mtt expert buffer ({args.experts} x {args.expert_epochs} epochs), not in the table: "
          f"{build_s:.1f} s wall, {build_cpu_s:.1f} s CPU")
    print(dc_note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "device": str(device),
                       "threads": torch.get_num_threads(), "expert_build_s": build_s,
                       "expert_build_cpu_s": build_cpu_s, "rows": [asdict(r) for r in rows]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
