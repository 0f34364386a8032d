"""Helpers the benchmark scripts share (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from mim4dd.data import RealData, Split
from mim4dd.datasets import DATASETS
from mim4dd.device import resolve_device


def prepare(device_name: str, threads: int) -> torch.device:
    """Set torch's CPU threads (0 keeps the default), resolve the device, print the machine."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    print(f"torch {torch.__version__} | device {device} | CPU threads {torch.get_num_threads()} | "
          f"{platform.processor() or platform.machine()} | python {platform.python_version()}")
    return device


def generated_like(dataset: str, train_per_class: int, val_images: int = 0,
                   test_images: int = 0, seed: int = 0) -> RealData:
    """Random tensors with a registry dataset's shape and classes, where the data is not on
    the machine (offline, no CIFAR): a step's time and memory depend on shapes, not pixels."""
    info = DATASETS[dataset]
    generator = torch.Generator().manual_seed(seed)

    def split(labels: torch.Tensor) -> Split:
        shape = (len(labels), info.channels, info.image_size, info.image_size)
        return Split(torch.randn(shape, generator=generator), labels)

    classes = info.num_classes
    return RealData(
        info, train=split(torch.arange(classes).repeat_interleave(train_per_class)),
        val=split(torch.arange(val_images) % classes),
        test=split(torch.arange(test_images) % classes),
        class_names=[f"class {i}" for i in range(classes)],
    )


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(
    title: str, headers: list[str], cells: list[list[str]], width: int = 160
) -> None:
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right")
    for row in cells:
        table.add_row(*row)
    Console(width=width).print(table)


@dataclass
class Sample:
    """One timed call: wall seconds, this process's user and system CPU seconds, and its
    minor page faults (getrusage: CPU time and faults are less disturbed by other load)."""

    wall: float
    user: float
    sys: float
    faults: int


def measure(work) -> Sample:
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return Sample(wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                  after.ru_minflt - before.ru_minflt)


def interleaved(work: dict, rounds: int) -> dict:
    """One warm-up call each, then `rounds` measured calls each in alternating order."""
    for call in work.values():
        call()
    samples: dict = {name: [] for name in work}
    names = list(work)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(measure(work[name]))
    return samples


def time_interleaved(distillers: list, steps: int, device: torch.device):
    """Warm each up with one step, then `steps` timed steps each, in alternating order:
    (wall seconds, CPU seconds) per distiller, one list each."""
    def step(distiller):
        return lambda: (distiller.step(), sync(device))

    samples = interleaved({i: step(d) for i, d in enumerate(distillers)}, steps)
    wall = [[s.wall for s in samples[i]] for i in range(len(distillers))]
    cpu = [[s.user + s.sys for s in samples[i]] for i in range(len(distillers))]
    return wall, cpu
