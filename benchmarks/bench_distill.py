"""Seconds per distillation iteration: the DM base (lam = 0) against DM + MIM (lam > 0).

For every input shape and IPC, two `Distiller`s are built on the same data, one with
``lam=0`` and one with ``lam=--lam`` (0.8 by default); each takes one warm-up step, then
``--steps`` timed steps. The two are timed *interleaved* (A B B A A B ...), so that load from
other processes on a shared machine falls on both alike; the table reports the median
seconds per iteration of each and their ratio, which is the overhead of the MIM term.

Shapes:
  28  FashionMNIST, 1 x 28 x 28, the real data set (Debian's package works offline).
  32  3 x 32 x 32 tensors shaped like CIFAR10 but GENERATED at random here (no CIFAR offline);
      per-iteration cost depends on the shapes only, not on the pixel values.

    python benchmarks/bench_distill.py --steps 3 --batch-real 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
from _common import generated_like, prepare, print_table, time_interleaved

from mim4dd.config import Config, ModelConfig
from mim4dd.data import load_dataset
from mim4dd.distill import Distiller


@dataclass
class Row:
    shape: str
    data: str
    ipc: int
    batch_real: int
    lam: float
    median_s: float  # wall clock
    min_s: float
    max_s: float
    cpu_median_s: float  # CPU time of this process (all threads), less sensitive to other load
    steps: int
    ratio: float | None  # median(lam) / median(lam=0), wall clock; None on the lam = 0 row
    cpu_ratio: float | None  # the same on CPU time


def print_results(rows: list[Row], title: str) -> None:
    headers = ["shape", "data", "ipc", "batch_real", "lam", "s/iter (median)", "min", "max",
               "lam/lam=0", "CPU s/iter", "lam/lam=0 (CPU)"]
    cells = [
        [r.shape, r.data, str(r.ipc), str(r.batch_real), f"{r.lam:g}", f"{r.median_s:.3f}",
         f"{r.min_s:.3f}", f"{r.max_s:.3f}", "" if r.ratio is None else f"{r.ratio:.2f}x",
         f"{r.cpu_median_s:.3f}", "" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}x"]
        for r in rows
    ]
    print_table(title, headers, cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--batch-real", type=int, default=256, help="real images per class")
    parser.add_argument("--width", type=int, default=128, help="ConvNet channels")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--lam", type=float, default=0.8, help="MIM weight compared with 0")
    parser.add_argument("--shapes", type=int, nargs="+", default=[28, 32], choices=[28, 32],
                        help="28: FashionMNIST (real); 32: generated CIFAR10-shaped tensors")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lam <= 0:
        parser.error("--steps must be >= 1 and --lam > 0")
    device = prepare(args.device, args.threads)

    print(f"DM base, ConvNet-3 width {args.width}; {args.steps} timed steps after 1 warm-up, "
          f"lam=0 and lam={args.lam:g} interleaved")

    rows: list[Row] = []
    for size in args.shapes:
        if size == 28:
            data, label, dataset = load_dataset("FashionMNIST"), "FashionMNIST", "FashionMNIST"
        else:
            per_class = max(args.batch_real, max(args.ipc))
            data = generated_like("CIFAR10", per_class, val_images=100, test_images=100)
            label, dataset = "GENERATED", "CIFAR10"
            print(f"NOTE: the 32x32 inputs are GENERATED random tensors shaped like CIFAR10 "
                  f"(10 classes x {per_class} images, 3x32x32); no CIFAR10 is read.")
        shape = "x".join(map(str, data.image_shape))
        for ipc in args.ipc:
            common = dict(
                dataset=dataset, ipc=ipc, batch_real=args.batch_real, device=args.device,
                model=ModelConfig(width=args.width), iterations=args.steps + 1,
            )
            base = Distiller(Config(lam=0.0, **common), data)
            mim = Distiller(Config(lam=args.lam, **common), data)
            (w_base, w_mim), (c_base, c_mim) = time_interleaved([base, mim], args.steps, device)
            m_base, m_mim = statistics.median(w_base), statistics.median(w_mim)
            cm_base, cm_mim = statistics.median(c_base), statistics.median(c_mim)
            for lam, wall, cpu, ratio, cpu_ratio in (
                (0.0, w_base, c_base, None, None),
                (args.lam, w_mim, c_mim, m_mim / m_base, cm_mim / cm_base),
            ):
                rows.append(Row(shape, label, ipc, args.batch_real, lam,
                                statistics.median(wall), min(wall), max(wall),
                                statistics.median(cpu), len(wall), ratio, cpu_ratio))
            print(f"  {shape} ipc {ipc}: lam=0 {m_base:.3f} s/iter, lam={args.lam:g} "
                  f"{m_mim:.3f} s/iter, ratio {m_mim / m_base:.2f}x "
                  f"(CPU time: {cm_base:.3f} / {cm_mim:.3f}, {cm_mim / cm_base:.2f}x)", flush=True)
            del base, mim

    print()
    print_results(rows, f"s per distillation iteration (median of {args.steps}); "
                      "ratio = MIM term overhead")
    if any(r.data == "GENERATED" for r in rows):
        print("32x32 rows use GENERATED random data shaped like CIFAR10 (timing only).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "device": str(device),
                       "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
