"""Helpers the benchmark scripts share (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table


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
