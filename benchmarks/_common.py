"""Helpers the benchmark scripts share (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from mim4dd.device import resolve_device


def prepare(device_name: str, threads: int) -> torch.device:
    """Set torch's CPU threads (0 keeps the default), resolve the device, print the machine."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    print(f"torch {torch.__version__} | device {device} | CPU threads {torch.get_num_threads()} | "
          f"{platform.processor() or platform.machine()} | python {platform.python_version()}")
    return device


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


def time_interleaved(distillers: list, steps: int, device: torch.device):
    """Warm each up with one step, then `steps` timed steps each, in alternating order."""
    for distiller in distillers:
        distiller.step()
    sync(device)
    wall: list[list[float]] = [[] for _ in distillers]
    cpu: list[list[float]] = [[] for _ in distillers]
    forward = list(range(len(distillers)))
    for i in range(steps):
        for which in forward if i % 2 == 0 else forward[::-1]:
            started, started_cpu = time.perf_counter(), time.process_time()
            distillers[which].step()
            sync(device)
            wall[which].append(time.perf_counter() - started)
            cpu[which].append(time.process_time() - started_cpu)
    return wall, cpu
