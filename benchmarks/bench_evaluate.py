"""Seconds per evaluation: N networks trained together (vmap) against one after another.

`Evaluator.evaluate(images, labels, parallel=True)` stacks the N networks' parameters and runs
them through one `torch.func.vmap` call; `parallel=False` trains them one at a time (the same
code with groups of one network). Both are given the same synthetic set: IPC real
FashionMNIST training images per class, taken with `data.sample_per_class`. The networks
are seeded, so the two paths should reach the same accuracies; the benchmark prints the
largest absolute difference.

Besides the whole `evaluate` call, the script reports where the time goes: training
(`Evaluator._train`) and the test / validation passes (`Evaluator._accuracy`), by wrapping
those two methods of the benchmark's own Evaluator instance with timers (the engine is not
modified), and the process's CPU time per evaluation (`time.process_time`, all threads),
which other load on a shared machine disturbs much less than wall-clock time. On a slow CPU the full test split (10,000 images x N networks) dominates a short
evaluation; `--test-images` / `--val-images` take the first so many images of each split.

    python benchmarks/bench_evaluate.py --epochs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

import torch
from _common import prepare, print_table, sync

from mim4dd.config import EvalConfig, ModelConfig
from mim4dd.data import RealData, Split, load_dataset
from mim4dd.evaluate import Evaluator

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def head(split: Split, n: int | None) -> Split:
    if n is None or n >= len(split):
        return split
    return Split(split.images[:n], split.labels[:n])


class PhaseTimer:
    """Wraps an Evaluator instance's `_train` and `_accuracy` to add up their seconds."""

    def __init__(self, evaluator: Evaluator, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        for name, phase in (("_train", "train"), ("_accuracy", "test")):
            original = getattr(evaluator, name)
            setattr(evaluator, name, self._timed(original, phase, device))

    def _timed(self, fn, phase: str, device: torch.device):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            self.seconds[phase] += time.perf_counter() - started
            return out

        return wrapper

    def reset(self) -> None:
        self.seconds.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--num-nets", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size")
    parser.add_argument("--repeats", type=int, default=1,
                        help="evaluations per path and IPC (median reported); the order of "
                             "the two paths alternates between repeats")
    parser.add_argument("--test-images", type=int, default=None,
                        help="first N test images only (default: the whole test split)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="first N validation images only; 0 skips validation")
    parser.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0, help="which real images form the set")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = prepare(args.device, args.threads)

    full = load_dataset("FashionMNIST")
    data = RealData(full.info, full.train, head(full.val, args.val_images),
                    head(full.test, args.test_images), full.class_names)
    eval_config = EvalConfig(num_nets=args.num_nets, epochs=args.epochs,
                             batch_size=args.batch_size, dsa=not args.no_dsa)
    evaluator = Evaluator(eval_config, ModelConfig(width=args.width), data, DSA_STRATEGY, device)
    timer = PhaseTimer(evaluator, device)

    print(f"FashionMNIST, ConvNet-3 width {args.width}, {args.num_nets} nets, {args.epochs} epochs, "
          f"batch {args.batch_size}, DSA {'off' if args.no_dsa else 'on'}, "
          f"test images {len(data.test)}, val images {len(data.val)}, repeats {args.repeats}")

    # One-time costs (thread pool start, first vmap trace, lazy imports) are paid here, by a
    # 1-epoch evaluation of each path on a 10-image test split, and left out of the timings.
    warm_data = RealData(data.info, data.train, head(data.val, 0), head(data.test, 10),
                         data.class_names)
    warm = Evaluator(eval_config.model_copy(update={"epochs": 1}), ModelConfig(width=args.width),
                     warm_data, DSA_STRATEGY, device)
    warm_images, warm_labels = data.sample_per_class(min(args.ipc), torch.Generator())
    for parallel in (True, False):
        warm.evaluate(warm_images, warm_labels, parallel=parallel)

    results = []
    for ipc in args.ipc:
        images, labels = data.sample_per_class(ipc, torch.Generator().manual_seed(args.seed))
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(args.repeats):
            for parallel in ((True, False) if r % 2 == 0 else (False, True)):
                timer.reset()
                started, started_cpu = time.perf_counter(), time.process_time()
                result = evaluator.evaluate(images, labels, parallel=parallel)
                sync(device)
                total = time.perf_counter() - started
                cpu = time.process_time() - started_cpu
                runs[parallel].append(
                    {"total": total, "cpu": cpu, **timer.seconds, "result": result}
                )
        summary = {"ipc": ipc, "images": len(labels)}
        for parallel, key in ((True, "parallel"), (False, "sequential")):
            summary[key] = {
                phase: statistics.median(run[phase] for run in runs[parallel])
                for phase in ("total", "cpu", "train", "test")
            }
        p_res, s_res = runs[True][-1]["result"], runs[False][-1]["result"]
        diffs = [abs(a - b) for a, b in zip(p_res.test_accuracies, s_res.test_accuracies)]
        val_diffs = [abs(a - b) for a, b in zip(p_res.val_accuracies, s_res.val_accuracies)]
        summary["max_abs_test_acc_diff"] = max(diffs)
        summary["max_abs_val_acc_diff"] = max(val_diffs) if val_diffs else None
        summary["test_acc_parallel"] = p_res.test_accuracies
        summary["test_acc_sequential"] = s_res.test_accuracies
        for phase in ("total", "cpu", "train", "test"):
            summary[f"speedup_{phase}"] = summary["sequential"][phase] / summary["parallel"][phase]
        results.append(summary)
        print(f"  ipc {ipc}: parallel {summary['parallel']['total']:.2f} s, sequential "
              f"{summary['sequential']['total']:.2f} s, speed-up {summary['speedup_total']:.2f}x, "
              f"(CPU time {summary['speedup_cpu']:.2f}x), "
              f"max |acc diff| {summary['max_abs_test_acc_diff']:.2e}", flush=True)

    print()
    print_results(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "device": str(device),
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


def print_results(results: list[dict], args) -> None:
    headers = ["ipc", "images", "parallel s/eval", "sequential s/eval", "speed-up",
               "train par / seq s", "train speed-up", "test+val par / seq s", "test+val speed-up",
               "CPU s par / seq", "CPU speed-up", "max |acc diff|", "mean acc (par)"]
    cells = []
    for s in results:
        p, q = s["parallel"], s["sequential"]
        cells.append([
            str(s["ipc"]), str(s["images"]), f"{p['total']:.2f}", f"{q['total']:.2f}",
            f"{s['speedup_total']:.2f}x", f"{p['train']:.2f} / {q['train']:.2f}",
            f"{s['speedup_train']:.2f}x", f"{p['test']:.2f} / {q['test']:.2f}",
            f"{s['speedup_test']:.2f}x", f"{p['cpu']:.1f} / {q['cpu']:.1f}",
            f"{s['speedup_cpu']:.2f}x", f"{s['max_abs_test_acc_diff']:.1e}",
            f"{100 * statistics.fmean(s['test_acc_parallel']):.2f}%",
        ])
    title = (f"s per evaluation ({args.num_nets} nets, {args.epochs} epochs); "
             "speed-up = sequential / parallel")
    print_table(title, headers, cells, width=200)


if __name__ == "__main__":
    raise SystemExit(main())
