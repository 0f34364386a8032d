"""`make gpu-check`: what a GPU machine tells us, in one run of at most 8 minutes, offline.

Parts, in order (each has a time budget; one that no longer fits in what is left of the total is
skipped with a note, and one that fails records its error while the next part runs):

  cuda_tests        tests/test_cuda.py, by pytest in a subprocess
  step_times        seconds per distillation step of dm, dc, mtt and cafe at lam 0 and 0.8, on
                    the GPU and on the CPU (generated CIFAR-10-shaped data; mtt on a tiny buffer)
  syncs             per step of each base: the ops that make the host wait for the GPU, and the
                    copies between devices (`mim4dd.syncs.SyncCounter`)
  evaluation        a 5-network evaluation, trained together (vmap) against one after another
  peak_memory       peak GPU memory per preset of sweeps/main_table.yaml (generated data of the
                    real shapes and training-set sizes)
  service_overhead  a trial's step rate through the sweep service against the bare engine
                    (benchmarks/bench_service_overhead.py in a subprocess)
  sweep_sharing     4 trials sharing one GPU (resources.gpu 0.25) against one trial alone, each
                    a `mim4dd-sweep launch` in a subprocess with a fresh MIM4DD_HOME

The report is printed and written as gpu-check.json and gpu-check.md into --out (default: $OUT
when set, else ./gpu-check-report/), after every part. Exit status: 0; 1 when a part failed;
2 without CUDA (in seconds, nothing measured). `--dry-run-cpu` runs every part in a tiny form on
the CPU, without budgets, and skips the CUDA tests (they only skip there) and the two parts that
start Ray (tests/test_gpu_check.py runs it).

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 470] [--only PART ...]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from _common import generated_like, measure, sync

from mim4dd.config import Config
from mim4dd.data import OFFLINE_ENV, RealData
from mim4dd.datasets import DATASETS
from mim4dd.distill import Distiller
from mim4dd.evaluate import EvalResult, Evaluator
from mim4dd.experiment import evaluator_for
from mim4dd.experts import expert_key, key_digest, train_experts
from mim4dd.syncs import SyncCounter

ROOT = Path(__file__).resolve().parents[1]
MAIN_TABLE = ROOT / "sweeps" / "main_table.yaml"
BASES = ["dm", "dc", "mtt", "cafe"]
LAMS = [0.0, 0.8]
NO_CUDA_EXIT = 2
# 8 minutes less ~10 s for Python's start and the imports: the budget's clock starts in main().
BUDGET_S = 470.0
# mtt settings that change what a step computes but not its cost or memory: one expert, matched
# from its first epoch (so a buffer need only be as long as one match), and a learned step size
# that stays put (on random data it leaves its allowed range within two steps, ending the run).
MTT_COST_NEUTRAL = {"num_experts": 1, "max_start_epoch": 1, "lr_lr": 1e-9}
MEMORY_STEPS = 2  # the first step builds what later steps reuse (optimiser state, heads)
# CIFAR's 50,000 training images less the 10 % validation hold-out: all go to a trial's GPU.
CIFAR_TRAIN_IMAGES = 45_000
# Trials of the sharing sweep: digits (bundled, offline), long enough for the GPU work to show
# next to a trial worker's start-up.
SWEEP_ENGINE = {"dataset": "digits", "ipc": 1, "iterations": 300, "batch_real": 64,
                "model": {"width": 32}, "device": "cuda",
                "eval": {"epochs": 100, "lr": 0.1, "num_nets": 2}}
SWEEP_SHARE = 0.25  # of one GPU per trial: four trials on one GPU


@dataclass(frozen=True)
class Sizes:
    """How large the parts run: `FULL` on the GPU, `TINY` for --dry-run-cpu."""

    ipc: int = 10  # step_times and syncs
    batch_real: int = 256
    width: int = 128
    syn_steps: int = 20  # mtt
    gpu_steps: int = 10  # timed steps per configuration, after one warm-up step
    cpu_steps: int = 2  # a dc step on the CPU takes seconds
    eval_ipcs: tuple[int, ...] = (1, 10, 50)
    eval_epochs: int = 100  # the protocol's 300 would triple the part for the same ratio
    eval_rounds: int = 2
    test_images: int = 10_000  # CIFAR-10's test split
    val_images: int = 5_000  # its validation hold-out
    memory_train_images: int = CIFAR_TRAIN_IMAGES
    memory_overrides: dict = field(default_factory=dict)  # none: the paper's settings
    service_iterations: int = 300


FULL = Sizes()
TINY = Sizes(ipc=1, batch_real=4, width=8, syn_steps=2, gpu_steps=1, cpu_steps=1,
             eval_ipcs=(1,), eval_epochs=1, eval_rounds=1, test_images=20, val_images=10,
             memory_train_images=400,
             memory_overrides={"ipc": 1, "syn_steps": 2, "batch_real": 2, "batch_syn": None,
                               "model": {"width": 8}})


class PartError(Exception):
    """A part could not measure what it measures; the message says why."""


class Skip(Exception):
    """The part is not run, for the reason given."""


# --- timing, data, subprocesses --------------------------------------------------------------


def timed_rounds(calls: dict[str, Callable[[], object]], rounds: int, deadline: float,
                 warm_up: bool = True) -> dict[str, list[float]]:
    """Wall seconds of each call: one warm-up call each, then up to `rounds` rounds in
    alternating order (as `_common.interleaved`: background load falls on all alike). No
    round starts past `deadline` (monotonic clock); the first always runs."""
    if warm_up:
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for number in range(rounds):
        if number and time.monotonic() > deadline:
            break
        for name in names if number % 2 == 0 else names[::-1]:
            seconds[name].append(measure(calls[name]).wall)
    return seconds


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def step_call(distiller: Distiller) -> Callable[[], None]:
    """One distillation step, finished on the device before the timer stops."""
    return lambda: (distiller.step(), sync(distiller.device))


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_command(command: list[str], deadline: float, env: dict | None = None) -> tuple[str, float]:
    """Run `command` from the repository root, stopped at `deadline`: (its output, wall s).
    A non-zero exit is a PartError carrying the output's tail."""
    started = time.perf_counter()
    # Output to a file, not a pipe: a Ray process outliving the command could hold a pipe open.
    # Its own session: Ray puts its processes in groups of their own, and a command stopped at
    # its deadline must not leave them holding the GPU for the next part.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_session(process)
        log.seek(0)
        output = log.read()
    what = f"`{shlex.join(command)}`"
    if process.returncode is None or process.returncode < 0:
        raise PartError(f"{what} ran past the part's budget and was stopped; its output ended:"
                        f"\n{tail(output)}")
    if process.returncode != 0:
        raise PartError(f"{what} exited with {process.returncode}; its output ended:\n"
                        f"{tail(output)}")
    return output, time.perf_counter() - started


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM the command (a launch then stops its Ray cluster); 15 s later, SIGKILL whatever
    of its session is left."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == process.pid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    process.wait()
    process.returncode = process.returncode if process.returncode < 0 else -signal.SIGTERM


def tail(text: str, chars: int = 2000) -> str:
    return text[-chars:].strip()


def service_env(**extra: str) -> dict:
    """This environment without a remote Ray cluster or tracking server: a local one each."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def parse_rich_table(text: str) -> list[dict[str, str]]:
    """The rows of a table printed by `_common.print_table` (rich's box characters)."""
    def cells(line: str, bar: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip(bar).split(bar)]

    lines = [line.strip() for line in text.splitlines()]
    headers = next((cells(line, "┃") for line in lines if line.startswith("┃")), None)
    if headers is None:
        return []
    return [dict(zip(headers, cells(line, "│"), strict=False)) for line in lines
            if line.startswith("│")]


# --- what the parts share -------------------------------------------------------------------


@dataclass
class Check:
    """What the parts share: the mode, the sizes, the current part's deadline, a temporary
    folder, and the generated data and expert buffers, each built once."""

    dry_run: bool
    temp: Path
    sizes: Sizes = FULL
    deadline: float = float("inf")
    expert_build_s: dict[str, float] = field(default_factory=dict)
    _data: dict[tuple, RealData] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """Where the GPU side runs: on the CPU in a dry run."""
        return "cpu" if self.dry_run else "cuda"

    def data(self, dataset: str, train_per_class: int, val_images: int = 0,
             test_images: int = 0) -> RealData:
        key = (dataset, train_per_class, val_images, test_images)
        if key not in self._data:
            self._data[key] = generated_like(*key)
        return self._data[key]

    def with_experts(self, config: Config, data: RealData) -> Config:
        """`config` reading an expert buffer made for it, trained here once per buffer key."""
        digest = key_digest(expert_key(config, data))
        config = config.model_copy(update={"expert_dir": str(self.temp / f"experts-{digest}")})
        if digest not in self.expert_build_s:
            started = time.perf_counter()
            train_experts(config, data=data)
            self.expert_build_s[digest] = round(time.perf_counter() - started, 2)
        return config

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline


def step_data(check: Check) -> RealData:
    sizes = check.sizes
    return check.data("CIFAR10", max(sizes.batch_real, sizes.ipc))


def base_configs(check: Check, data: RealData, device: str) -> list[Config]:
    """Every base at every lam on `device`, at the check's step sizes; mtt on a tiny buffer."""
    sizes, configs = check.sizes, []
    for base in BASES:
        mtt = {**MTT_COST_NEUTRAL, "syn_steps": sizes.syn_steps, "expert_epochs": 2,
               "expert_train_epochs": 2} if base == "mtt" else {}
        for lam in LAMS:
            config = Config.model_validate({
                "dataset": data.info.name, "base": base, "lam": lam, "ipc": sizes.ipc,
                "batch_real": sizes.batch_real, "model": {"width": sizes.width},
                "device": device, **mtt,
            })
            configs.append(check.with_experts(config, data) if mtt else config)
    return configs


# --- the parts ------------------------------------------------------------------------------


def part_cuda_tests(check: Check) -> dict:
    if check.dry_run:  # ~3 s of a pytest process whose tests only skip without CUDA
        raise Skip("tests/test_cuda.py skips without CUDA (and make test runs it anyway)")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
               "tests/test_cuda.py"]
    output, seconds = run_command(command, check.deadline)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped)", summary)}
    # On the GPU a skipped test means that pytest saw no CUDA: nothing was checked.
    if not check.dry_run and (counts.get("skipped") or not counts.get("passed")):
        raise PartError(f"the CUDA tests did not run on the GPU: {summary}")
    return {"command": shlex.join(["python", *command[1:]]), "summary": summary,
            "wall_s": round(seconds, 1), **counts}


def part_step_times(check: Check) -> dict:
    sizes, data = check.sizes, step_data(check)
    seconds = {}
    for side, device, steps in (("gpu", check.device, sizes.gpu_steps),
                                ("cpu", "cpu", sizes.cpu_steps)):
        distillers = [Distiller(config, data) for config in base_configs(check, data, device)]
        calls = {(d.config.base, d.config.lam): step_call(d) for d in distillers}
        seconds[side] = timed_rounds(calls, steps, check.deadline)
        del distillers, calls
        free_device_memory()
    rows = []
    for (base, lam), gpu in seconds["gpu"].items():
        cpu = seconds["cpu"][base, lam]
        rows.append({"base": base, "lam": lam, "gpu_median_s": median(gpu),
                     "gpu_min_s": round(min(gpu), 4), "gpu_steps": len(gpu),
                     "cpu_median_s": median(cpu), "cpu_steps": len(cpu),
                     "cpu_over_gpu": round(median(cpu) / median(gpu), 2)})
    return {"rows": rows, "notes": [
        (f"generated CIFAR-10-shaped data (3x32x32, 10 classes x {len(data.train) // 10}); "
         f"IPC {sizes.ipc}, batch_real {sizes.batch_real}, ConvNet-3 width {sizes.width}, "
         f"{torch.get_num_threads()} CPU threads; medians after 1 warm-up step, the 8 "
         "configurations interleaved"),
        (f"mtt: syn_steps {sizes.syn_steps}, expert_epochs 2, on a 1-expert buffer built in "
         f"{sum(check.expert_build_s.values()):.1f} s (not in the table)"),
    ]}


def part_syncs(check: Check) -> dict:
    data, rows, notes = step_data(check), [], []
    for config in base_configs(check, data, check.device):
        if check.past_deadline():
            notes.append(f"stopped at the part's budget before {config.base} lam {config.lam}")
            break
        distiller = Distiller(config, data)
        distiller.step()  # the first step builds what later steps reuse
        with SyncCounter() as counter:
            distiller.step()
        sync(distiller.device)
        rows.append({"base": config.base, "lam": config.lam, "syncs": counter.total,
                     "syncs_by_op": dict(counter.by_op),
                     "transfers": sum(counter.transfers.values()),
                     "transfers_by_op": dict(counter.transfers)})
    return {"rows": rows, "notes": [
        *notes,
        ("one step after a warm-up step, at step_times' settings; the logged loss's read-back "
         "(a tolist) is each step's one sync by design and is not an op the counter sees"),
        "transfers: copies between devices (none on the CPU)",
    ]}


def part_evaluation(check: Check) -> dict:
    sizes = check.sizes
    data = check.data("CIFAR10", max(sizes.eval_ipcs), sizes.val_images, sizes.test_images)
    config = Config.model_validate({
        "dataset": "CIFAR10", "device": check.device, "model": {"width": sizes.width},
        "eval": {"num_nets": 5, "epochs": sizes.eval_epochs}})
    evaluator = evaluator_for(config, data)
    # A 1-epoch evaluation of each path warms up its kernels and the splits' copies.
    warm_up = evaluator_for(config.model_copy(
        update={"eval": config.eval.model_copy(update={"epochs": 1})}), data)
    rows, notes = [], []
    for ipc in sizes.eval_ipcs:
        if check.past_deadline():
            notes.append(f"stopped at the part's budget before IPC {ipc}")
            break
        images, labels = data.sample_per_class(ipc, torch.Generator().manual_seed(0))
        for parallel in (True, False):
            warm_up.evaluate(images, labels, parallel=parallel)
        results: dict[str, EvalResult] = {}
        calls = {path: evaluation_call(evaluator, images, labels, path, results)
                 for path in ("vmap", "sequential")}
        seconds = timed_rounds(calls, sizes.eval_rounds, check.deadline, warm_up=False)
        vmap, sequential = median(seconds["vmap"]), median(seconds["sequential"])
        pairs = zip(results["vmap"].test_accuracies, results["sequential"].test_accuracies,
                    strict=True)
        rows.append({"ipc": ipc, "images": len(labels), "vmap_s": vmap,
                     "sequential_s": sequential, "speed_up": round(sequential / vmap, 2),
                     "max_acc_diff": max(abs(a - b) for a, b in pairs),
                     "rounds": len(seconds["vmap"])})
    notes.append(f"5 ConvNet-3 (width {sizes.width}), {sizes.eval_epochs} epochs, generated "
                 f"CIFAR-10-shaped data, {sizes.test_images} test + {sizes.val_images} "
                 "validation images; speed_up = sequential / vmap")
    return {"rows": rows, "notes": notes}


def evaluation_call(evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor,
                    path: str, results: dict[str, EvalResult]) -> Callable[[], None]:
    """One evaluation along `path` (vmap or sequential), its result kept in `results`."""
    def call() -> None:
        results[path] = evaluator.evaluate(images, labels, parallel=path == "vmap")
    return call


def part_peak_memory(check: Check) -> dict:
    from orchestrator.spec import load_spec  # the spec alone: no Ray, no MLflow

    spec = load_spec(MAIN_TABLE)
    cells = {(t.config.preset, t.config.lam): t.config for t in spec.trials()}  # seeds alike
    if check.dry_run:  # one lam per preset: the rehearsal checks that every preset builds
        cells = {(preset, lam): c for (preset, lam), c in cells.items() if lam == min(LAMS)}
    # One buffer per dataset, as long as its presets' longest match.
    epochs: dict[str, int] = {}
    for config in cells.values():
        epochs[config.dataset] = max(epochs.get(config.dataset, 1), config.expert_epochs)
    share = spec.resources.gpu
    share_bytes = 0 if check.dry_run else torch.cuda.get_device_properties(0).total_memory * share
    rows, notes = [], []
    for (preset, lam), paper in cells.items():
        if check.past_deadline():
            notes.append(f"stopped at the part's budget before {preset} lam {lam}")
            break
        data = check.data(paper.dataset,
                          check.sizes.memory_train_images // DATASETS[paper.dataset].num_classes)
        config = Config.model_validate({
            **paper.model_dump(), **MTT_COST_NEUTRAL, "zca": False, "device": check.device,
            "expert_train_epochs": epochs[paper.dataset], **check.sizes.memory_overrides})
        config = check.with_experts(config, data)
        out_of_memory = False
        try:
            allocated, reserved = peak_memory(config, data)
        except torch.cuda.OutOfMemoryError:  # a finding too: more than this GPU's memory
            allocated = reserved = None
            out_of_memory = True
        free_device_memory()  # after the except block: its traceback held the Distiller
        fits = None if reserved is None else reserved <= share_bytes
        rows.append({"preset": preset, "lam": lam, "ipc": config.ipc,
                     "syn_steps": config.syn_steps, "batch_syn": config.batch_syn,
                     "peak_allocated_gib": gib(allocated), "peak_reserved_gib": gib(reserved),
                     "out_of_memory": out_of_memory, f"fits_gpu_{share:g}": fits})
    notes += [
        (f"{MAIN_TABLE.relative_to(ROOT)}: base {spec.engine.get('base')} at each preset's "
         f"settings, {MEMORY_STEPS} steps each, on generated data of the real shapes with "
         f"{check.sizes.memory_train_images} training images (a trial puts all on the GPU)"),
        ("changed as they change no shape: 1 expert, max_start_epoch 1, lr_lr 1e-9, "
         "expert_train_epochs cut to the match, ZCA off (it changes pixel values only)"),
        (f"fits_gpu_{share:g}: peak reserved <= {share:g} of the GPU's memory (the sweep's "
         "resources.gpu)"),
    ]
    if check.dry_run:
        notes.append(f"dry run: shrunk by {check.sizes.memory_overrides}; no CUDA memory stats")
    return {"rows": rows, "notes": notes}


def peak_memory(config: Config, data: RealData) -> tuple[int | None, int | None]:
    """Peak CUDA memory (allocated, reserved) of building a Distiller and taking its steps;
    None on the CPU."""
    on_gpu = config.device.startswith("cuda")
    if on_gpu:
        free_device_memory()
        torch.cuda.reset_peak_memory_stats()
    distiller = Distiller(config, data)
    for _ in range(MEMORY_STEPS):
        distiller.step()
    sync(distiller.device)
    del distiller
    if not on_gpu:
        return None, None
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def gib(size: int | None) -> float | None:
    return None if size is None else round(size / 2**30, 3)


def part_service_overhead(check: Check) -> dict:
    if check.dry_run:
        raise Skip("starts a Ray cluster (10-30 s): not rehearsed by --dry-run-cpu")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_service_overhead.py"),
               "--pairs", "1", "--iterations", str(check.sizes.service_iterations),
               "--report-every-s", "1"]
    # Its trial asks Ray for no GPU, so Ray hides the GPU from it; hiding it from the engine
    # side too compares a CPU step with a CPU step.
    output, seconds = run_command(command, check.deadline, service_env(CUDA_VISIBLE_DEVICES=""))
    rows = parse_rich_table(output)
    service = [row for row in rows if row.get("path") == "service"]
    if not service:
        raise PartError(f"no service row in the benchmark's output:\n{tail(output)}")
    return {"ratio": float(service[0]["ratio to engine"]), "wall_s": round(seconds, 1),
            "rows": rows, "notes": [
                (f"`{shlex.join(['python', *command[1:]])}` with CUDA hidden (both sides on "
                 "the CPU); ratio = the service's steps/s / the engine's, one pair")]}


def sweep_file(folder: Path, name: str, trials: int) -> Path:
    """A sweep of `trials` seeds, all running at once, each on a quarter of the GPU."""
    spec = {"name": name, "engine": SWEEP_ENGINE, "grid": {"seed": list(range(trials))},
            "resources": {"cpu": 2, "gpu": SWEEP_SHARE}, "max_concurrent": trials,
            "retries": 0, "checkpoint_every": 100,
            "pending_timeout_s": 60}  # a GPU that Ray cannot see ends the launch, not the budget
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def part_sweep_sharing(check: Check) -> dict:
    from orchestrator.spec import load_spec

    folder = check.temp / "sweeps"
    folder.mkdir(exist_ok=True)
    files = {"alone": sweep_file(folder, "gpu-check-alone", 1),
             "shared": sweep_file(folder, "gpu-check-shared", 4)}
    trials = {label: len(load_spec(path).trials()) for label, path in files.items()}  # valid?
    if check.dry_run:
        raise Skip(f"launching needs Ray and a GPU; its two sweep files are valid ({trials})")
    cli = Path(sys.executable).with_name("mim4dd-sweep")
    launch = [str(cli)] if cli.exists() else [sys.executable, "-m", "orchestrator.cli"]
    rows = []
    for label, path in files.items():
        env = service_env(MIM4DD_HOME=str(check.temp / f"home-{label}"))  # a new store each
        _, seconds = run_command([*launch, "launch", str(path)], check.deadline, env)
        rows.append({"sweep": label, "trials": trials[label], "gpu_per_trial": SWEEP_SHARE,
                     "max_concurrent": trials[label], "wall_s": round(seconds, 1)})
    alone, shared = rows[0]["wall_s"], rows[1]["wall_s"]
    return {"shared_over_alone": round(shared / alone, 2),
            "throughput_gain": round(trials["shared"] * alone / shared, 2), "rows": rows,
            "notes": [
                ("each a `mim4dd-sweep launch` with a fresh MIM4DD_HOME, so both pay Ray's and "
                 f"MLflow's start-up; trials: {SWEEP_ENGINE}"),
                "throughput_gain = 4 x alone / shared (4: perfect sharing, 1: none)"]}


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    run: Callable[[Check], dict]
    budget_s: float  # on the GPU machine (a --dry-run-cpu rehearsal has none)


PARTS = [
    Part("cuda_tests", "CUDA tests (tests/test_cuda.py)", part_cuda_tests, 60),
    Part("step_times", "Step time per base, GPU vs CPU", part_step_times, 150),
    Part("syncs", "Syncs per step per base", part_syncs, 30),
    Part("evaluation", "5-network evaluation, vmap vs sequential", part_evaluation, 60),
    Part("peak_memory", "Peak GPU memory per main_table preset", part_peak_memory, 90),
    Part("service_overhead", "Service / engine step rate", part_service_overhead, 60),
    Part("sweep_sharing", "4 trials sharing one GPU vs one alone", part_sweep_sharing, 120),
]


# --- running and reporting ------------------------------------------------------------------


def run_part(part: Part, check: Check, total_deadline: float) -> dict:
    """The part's entry of the report: status ok, skipped or failed, and what it measured."""
    budget = part.budget_s
    entry: dict = {"title": part.title, "budget_s": budget}
    # A rehearsal (--dry-run-cpu) runs every part whatever the machine's speed, so that its
    # test never depends on timing luck; on the GPU the budgets keep the check within 8 min.
    check.deadline = float("inf")
    if not check.dry_run:
        left = total_deadline - time.monotonic()
        if left < budget:
            return {**entry, "status": "skipped",
                    "note": f"needs {budget:.0f} s; {max(left, 0):.0f} s of the total budget left"}
        check.deadline = time.monotonic() + budget
    started = time.perf_counter()
    try:
        entry.update(status="ok", result=part.run(check))
    except Skip as skip:
        entry.update(status="skipped", note=str(skip))
    except Exception as exc:  # noqa: BLE001  (recorded in the report; the next part runs)
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                     traceback=tail(traceback.format_exc(), 4000))
    free_device_memory()
    return {**entry, "seconds": round(time.perf_counter() - started, 1)}


def machine() -> dict:
    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                                text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""  # a copy of the tree without git
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory)
            if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "commit": commit or "unknown"}


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [
        f"# GPU check ({report['mode']})", "",
        (f"Figures: `make gpu-check` · {report['date']} · {info['gpu'] or 'no GPU'}, "
         f"{info['cpu_cores']} CPU cores · engine at {info['commit']}"), "",
        (f"torch {info['torch']} (CUDA {info['cuda']}), {info['torch_threads']} torch threads, "
         f"python {info['python']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} "
         "s budget."),
    ]
    for number, (name, entry) in enumerate(report["parts"].items(), 1):
        took = f" in {entry['seconds']} s" if "seconds" in entry else ""
        lines += ["", f"## {number}. {entry['title']} (`{name}`)", "",
                  f"**{entry['status']}**{took} (budget {entry['budget_s']:.0f} s)"]
        if "note" in entry:
            lines += ["", entry["note"]]
        if "error" in entry:
            lines += ["", "```text", entry["error"], "```"]
        result = entry.get("result", {})
        facts = [f"- {key}: {value}" for key, value in result.items()
                 if key not in ("rows", "notes")]
        lines += ["", *facts, *(f"- {note}" for note in result.get("notes", []))]
        lines += markdown_table(result.get("rows", []))
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> list[str]:
    def cell(value) -> str:
        if isinstance(value, dict):  # {op: count}
            return ", ".join(f"{key} {count}" for key, count in value.items()) or "–"
        return "–" if value is None else str(value)

    if not rows:
        return []
    headers = list(rows[0])
    return ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(cell(row.get(h)) for h in headers) + " |" for row in rows)]


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or "gpu-check-report"),
                        help="report folder (default: $OUT if set, else ./gpu-check-report)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"total seconds (default {BUDGET_S:g}; none with --dry-run-cpu)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="every part tiny, on the CPU (no GPU needed; the Ray parts skipped)")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS],
                        help="run these parts only (say, to rerun a failed one)")
    args = parser.parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing "
              "measured. Run it on a GPU machine, or add --dry-run-cpu for a tiny rehearsal on "
              "the CPU.", file=sys.stderr)
        return NO_CUDA_EXIT
    os.environ.setdefault(OFFLINE_ENV, "1")  # the GPU machine has no network: fail, don't wait
    if args.dry_run_cpu:
        # Tiny tensors gain nothing from threads, and on a busy machine every op of a second
        # thread waits for a core (tiny steps measured 5-40x slower with two threads than one).
        torch.set_num_threads(1)
    budget = args.budget_s or BUDGET_S
    report = {"mode": "dry-run-cpu" if args.dry_run_cpu else "gpu", "argv": sys.argv[1:],
              "date": datetime.date.today().isoformat(), "budget_s": budget,
              "machine": machine(), "parts": {}, "failed": [], "elapsed_s": 0.0}
    parts = [p for p in PARTS if not args.only or p.name in args.only]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temp:
        check = Check(dry_run=args.dry_run_cpu, temp=Path(temp),
                      sizes=TINY if args.dry_run_cpu else FULL)
        for number, part in enumerate(parts, 1):
            print(f"[{number}/{len(parts)}] {part.name} ...", flush=True)
            entry = run_part(part, check, started + budget)
            report["parts"][part.name] = entry
            report["failed"] = [n for n, e in report["parts"].items() if e["status"] == "failed"]
            report["elapsed_s"] = round(time.monotonic() - started, 1)
            write_report(report, args.out)  # after every part: a killed run keeps what it had
            print(f"    {entry['status']} {entry.get('note', entry.get('error', ''))}".rstrip(),
                  flush=True)
    print(markdown(report))
    print(f"report: {args.out / 'gpu-check.json'} and {args.out / 'gpu-check.md'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
