"""The engine against reference-style loops: DM steps and one evaluation network.

Each engine workload is timed in the same process as its baseline (benchmarks/
reference_loops.py: the reference DC/DSA/DM code's loops written on our building blocks),
interleaved (A B B A ...), so load from other processes falls on both alike. Per step it
records wall time, this process's user and system CPU time and its minor page faults
(getrusage); the tables give medians and the ratio engine / baseline. It also measures the
machine's peak (a large float32 matmul) and the fraction of it the DM step's convolutions reach.

Both sides run in one process, so both get the engine's malloc setting (mim4dd/memory.py):
the ratio is about how the work is done, not about the allocator. `--malloc default` shows
the engine as it was before that setting (run it as its own process).

    python benchmarks/bench_speed.py --steps 5 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from _common import Sample, interleaved, measure, prepare, print_table
from reference_loops import ReferenceDM, reference_evaluate
from torch import nn

from mim4dd.config import Config, EvalConfig, ModelConfig
from mim4dd.data import RealData, Split, load_dataset
from mim4dd.distill import Distiller
from mim4dd.evaluate import Evaluator
from mim4dd.memory import ENV as MALLOC_ENV
from mim4dd.memory import keep_freed_memory
from mim4dd.models import ConvNet


def median(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples)


def matmul_peak(n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of a float32 n x n matmul, best of `repeats` (the machine's practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(measure(lambda: a @ b).wall for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def conv_flops_per_image(channels: int, size: int, model: ModelConfig) -> float:
    """Multiply-adds x 2 of the ConvNet's convolutions for one image, forward (the network's
    own layers on the meta device report their output sizes)."""
    flops: list[float] = []

    def count(conv: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        flops.append(2 * output[0].numel() * conv.in_channels * conv.kernel_size[0] ** 2)

    with torch.device("meta"):
        net = ConvNet(channels, size, 2, model)
        for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
            conv.register_forward_hook(count)
        net(torch.empty(1, channels, size, size))
    return sum(flops)


@dataclass
class Row:
    work: str
    ipc: int
    batch_real: int | None
    ours_s: float
    baseline_s: float
    ratio: float
    ours_user_s: float
    ours_sys_s: float
    ours_faults: float
    baseline_user_s: float
    baseline_sys_s: float
    baseline_faults: float
    ours_gflops: float | None = None


def row(work: str, ipc: int, batch_real: int | None, samples: dict, flops: float | None) -> Row:
    ours, base = samples["ours"], samples["baseline"]
    ours_s = median(ours, "wall")
    return Row(work, ipc, batch_real, ours_s, median(base, "wall"),
               ours_s / median(base, "wall"), median(ours, "user"), median(ours, "sys"),
               median(ours, "faults"), median(base, "user"), median(base, "sys"),
               median(base, "faults"), None if flops is None else flops / ours_s / 1e9)


def dm_rows(data: RealData, args) -> list[Row]:
    rows = []
    info = data.info
    per_image = conv_flops_per_image(info.channels, info.image_size, ModelConfig(width=args.width))
    for ipc in args.ipc:
        for batch_real in args.batch_real:
            config = Config(dataset=info.name, ipc=ipc, batch_real=batch_real, lam=0.0,
                            model=ModelConfig(width=args.width), iterations=10**6, device="cpu",
                            compile=args.compile)
            ours = Distiller(config, data)
            baseline = ReferenceDM(config, data, ours.images)
            samples = interleaved({"ours": ours.step, "baseline": baseline.step}, args.steps)
            # Real images forward only; synthetic ones forward and back to the pixels.
            classes = info.num_classes
            flops = per_image * classes * (batch_real + 2 * ipc)
            rows.append(row("DM step", ipc, batch_real, samples, flops))
            print_progress(rows[-1])
    return rows


def eval_rows(data: RealData, args) -> list[Row]:
    rows = []
    config = Config(dataset=data.info.name, device="cpu", model=ModelConfig(width=args.width),
                    eval=EvalConfig(num_nets=1, epochs=args.epochs))
    for ipc in args.ipc:
        images, labels = data.sample_per_class(ipc, torch.Generator().manual_seed(0))
        evaluator = Evaluator(config.eval, config.model, data, config.dsa_strategy,
                              compile=args.compile)
        work = {
            "ours": partial(evaluator.evaluate, images, labels, parallel=False),
            "baseline": partial(reference_evaluate, images, labels, data, config.eval,
                                config.model, config.dsa_strategy, seed=0),
        }
        rows.append(row(f"eval net, {args.epochs} epochs", ipc, None,
                        interleaved(work, args.eval_rounds), None))
        print_progress(rows[-1])
    return rows


def print_progress(r: Row) -> None:
    print(f"  {r.work} ipc {r.ipc} real {r.batch_real}: ours {r.ours_s:.3f} s, baseline "
          f"{r.baseline_s:.3f} s, ratio {r.ratio:.2f}", flush=True)


def print_rows(rows: list[Row], peak: float) -> None:
    headers = ["work", "ipc", "real/class", "ours s", "baseline s", "ours/baseline",
               "ours user", "ours sys", "ours faults", "base user", "base sys", "base faults",
               "ours conv GFLOP/s", "% of peak"]
    cells = [[r.work, str(r.ipc), str(r.batch_real or "-"), f"{r.ours_s:.3f}",
              f"{r.baseline_s:.3f}", f"{r.ratio:.2f}", f"{r.ours_user_s:.3f}",
              f"{r.ours_sys_s:.3f}", f"{r.ours_faults:.0f}", f"{r.baseline_user_s:.3f}",
              f"{r.baseline_sys_s:.3f}", f"{r.baseline_faults:.0f}",
              "-" if r.ours_gflops is None else f"{r.ours_gflops:.0f}",
              "-" if r.ours_gflops is None else f"{100 * r.ours_gflops / peak:.0f}"]
             for r in rows]
    print_table("engine vs reference-style loops (medians per step / per evaluation)",
                headers, cells, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed DM steps per side")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--batch-real", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per evaluation network")
    parser.add_argument("--eval-rounds", type=int, default=3, help="timed evaluations per side")
    parser.add_argument("--test-images", type=int, default=2000,
                        help="first N test and validation images (the full passes dominate "
                        "a short evaluation)")
    parser.add_argument("--only", choices=["dm", "eval"], default=None)
    parser.add_argument("--malloc", choices=["engine", "default"], default="engine",
                        help="default: leave glibc malloc alone (the engine before memory.py)")
    parser.add_argument("--compile", action="store_true",
                        help="the engine with torch.compile (Config.compile); compiling happens "
                        "in the untimed warm-up call")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.malloc == "default":
        os.environ[MALLOC_ENV] = "default"
    prepare("cpu", args.threads)
    print(f"malloc: {'engine (freed memory kept)' if keep_freed_memory() else 'glibc default'}")
    peak = matmul_peak()
    print(f"peak: {peak:.0f} GFLOP/s (4096^2 float32 matmul, best of 3)")
    data = load_dataset("FashionMNIST")
    head = args.test_images
    data = replace(data, test=Split(data.test.images[:head], data.test.labels[:head]),
                   val=Split(data.val.images[:head], data.val.labels[:head]))
    rows = []
    if args.only in (None, "dm"):
        rows += dm_rows(data, args)
    if args.only in (None, "eval"):
        rows += eval_rows(data, args)
    print_rows(rows, peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "peak_gflops": peak,
                       "malloc": args.malloc, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
