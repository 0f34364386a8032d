"""Progress in a log: when stderr is a file or a pipe, not a terminal, a progress bar draws
nothing readable there, so long work prints a plain line every few percent instead.

The one rule for every loop the engine CLI reports: distillation steps, each evaluation
network's epochs, each expert's epochs.
"""

from __future__ import annotations

from rich.console import Console


class LogLines:
    """Prints a line at every `total // lines`-th step of a loop and at its last (so about
    `lines` lines per loop), only when `console` is not a terminal."""

    def __init__(self, console: Console, lines: int):
        self.console, self.lines = console, lines

    def due(self, step: int, total: int) -> bool:
        every = max(1, total // self.lines)
        return not self.console.is_terminal and (step % every == 0 or step == total)

    def __call__(self, step: int, total: int, text: str) -> None:
        if self.due(step, total):
            self.console.print(text, highlight=False)


__all__ = ["LogLines"]
