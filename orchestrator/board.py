"""Sweep progress on the terminal: a live board of trials, fed by Tune's callbacks.

On a terminal the board is a live rich table (counts, and one line per running or failed
trial); in a log file it prints one plain line per change of a trial's state.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator.expand import Trial


class Board:
    """A live rich view of the sweep: counts, and one line per running or failed trial."""

    MAX_ROWS = 20

    def __init__(self, name: str, trials: list[Trial], skipped: set[str], console: Console):
        self.name = name
        self.iterations = {t.key: t.config.iterations for t in trials}
        self.state = {t.key: ("done" if t.key in skipped else "pending") for t in trials}
        self.detail: dict[str, str] = {}
        self.console = console
        # On a terminal, a live table; in a log file, one plain line per change of state.
        self.live = (Live(self.render(), console=console, auto_refresh=False, transient=False)
                     if console.is_terminal else None)
        self._last = 0.0

    def update(self, key: str, state: str | None = None, detail: str | None = None) -> None:
        if key not in self.state:
            return
        if state:
            self.state[key] = state
        if detail is not None:
            self.detail[key] = detail
        if self.live is None:
            if state:
                done = list(self.state.values()).count("done")
                self.console.print(f"[{done}/{len(self.state)} done] {escape(key)}: {state}"
                                   f"{' - ' + escape(detail) if detail else ''}", highlight=False)
            return
        now = time.monotonic()
        if state or now - self._last > 0.25:  # repaint on news, else at most 4 times a second
            self._last = now
            self.live.update(self.render(), refresh=True)

    def render(self) -> Group:
        counts = {s: list(self.state.values()).count(s)
                  for s in ("done", "running", "retrying", "failed", "pending")}
        head = (f"[bold]{self.name}[/]: {counts['done']}/{len(self.state)} done, "
                f"{counts['running'] + counts['retrying']} running, "
                f"[red]{counts['failed']} failed[/], {counts['pending']} pending")
        table = Table(box=None, pad_edge=False)
        for column in ("trial", "state", "progress"):
            table.add_column(column)
        shown = [k for k, s in self.state.items() if s in ("running", "retrying", "failed")]
        for key in shown[: self.MAX_ROWS]:
            state = self.state[key]
            style = {"failed": "red", "retrying": "yellow"}.get(state, "cyan")
            table.add_row(escape(key), f"[{style}]{state}[/]", escape(self.detail.get(key, "")))
        return Group(head, table) if shown else Group(head)


_BOARD: Board | None = None  # set by `showing`; Tune pickles its callbacks, so they look it up


def _key(trial: Any) -> str:
    """The sweep's trial key of a Tune trial (its param space entry)."""
    return str(trial.config.get("trial", trial))


try:
    from ray.tune import Callback as TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency of the sweep extra
    TuneCallback = object  # type: ignore[assignment,misc]


class BoardFeed(TuneCallback):
    """Tune events -> the board. Stateless: the board itself lives in this process."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "running", "starting")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _BOARD and "eval_networks" in result:
            _BOARD.update(_key(trial), None, f"evaluating: {result['eval_networks_done']}/"
                                             f"{result['eval_networks']} networks done "
                                             f"({result['eval_architecture']})")
        elif _BOARD and "loss" in result:
            key = _key(trial)
            total = _BOARD.iterations.get(key, 0)
            _BOARD.update(key, None, f"{result.get('iteration', 0)}/{total}  "
                                     f"loss {result['loss']:.4g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _BOARD:
            last = trial.last_result or {}
            if last.get("failed"):  # ended FAILED by the trainable itself (not retried)
                _BOARD.update(_key(trial), "failed", str(last.get("error", ""))[:120])
            else:
                _BOARD.update(_key(trial), "done", "")

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "retrying", _error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if _BOARD:
            _BOARD.update(_key(trial), "failed", _error_text(trial))


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        lines = []
    return lines[-1][:120] if lines else "error"


def trial_dirname(trial: Any) -> str:
    """Tune trial folders named after the trial key (readable, and findable by key)."""
    slug = re.sub(r"[^A-Za-z0-9_.=,-]", "_", _key(trial))[:80]
    return f"{slug}_{trial.trial_id}"


@contextmanager
def showing(board: Board | None) -> Iterator[None]:
    """Feed `board` from Tune's callbacks (and keep it live on a terminal) while inside."""
    global _BOARD
    _BOARD = board
    if board and board.live:
        board.live.start()
    try:
        yield
    finally:
        if board and board.live:
            board.live.stop()
        _BOARD = None


__all__ = ["Board", "BoardFeed", "showing", "trial_dirname"]
