"""Whether a Tune experiment folder may be restored: whole, and written only by this user.

`Tuner.restore` unpickles the folder's state files, so a folder another user could have
written is never restored (any such file could run code here); and a trial whose newest
checkpoint folder is gone would fail every relaunch with "Could not recover from checkpoint",
so such a folder is set aside and the trials start afresh in their same MLflow runs.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

RESULTS_FILE = "result.json"  # Tune's per-trial result rows (JSON lines)
CHECKPOINT_KEY = "checkpoint_dir_name"  # in a row that came with a checkpoint
STATE_GLOB = "experiment_state-*.json"  # Tune's experiment state, one per (re)launch
CHECKPOINT_NAME = re.compile(r"checkpoint_\d{6}")


def unsafe_files(folder: Path) -> list[str]:
    """Paths in `folder` (restore unpickles its state and the trials' params) that are links,
    are not owned by this user, or that group or others may write."""
    found = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found.append(f"{path} is a symbolic link")
        elif info.st_uid != os.getuid():
            found.append(f"{path} is owned by uid {info.st_uid}")
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            found.append(f"{path} is writable by group or others")
    return found


def missing_checkpoints(folder: Path) -> list[str]:
    """Trial folders whose newest checkpoint folder no longer exists. The newest is the latest
    named in the trial's result rows or in Tune's newest experiment state, whichever is later:
    a kill can leave the rows unwritten while the state already names the checkpoint."""
    missing = []
    named = _checkpoints_in_state(folder)
    for trial in sorted(p for p in folder.iterdir() if p.is_dir()):
        checkpoints = named.get(trial.name, set()) | _checkpoints_in_results(trial / RESULTS_FILE)
        if checkpoints and not (trial / max(checkpoints)).is_dir():
            missing.append(f"{trial.name}/{max(checkpoints)}")
    return missing


def _checkpoints_in_results(results: Path) -> set[str]:
    found = set()
    try:
        with open(results, encoding="utf-8") as rows:
            for line in rows:
                try:
                    found.add(json.loads(line).get(CHECKPOINT_KEY))
                except (ValueError, AttributeError):
                    continue  # a row cut short by a kill
    except OSError:
        pass
    return found - {None}


def _checkpoints_in_state(folder: Path) -> dict[str, set[str]]:
    """Checkpoint folder names each trial's entry in the newest experiment state mentions
    (read as JSON text only: the entries' own encoding is Tune's)."""
    states = sorted(folder.glob(STATE_GLOB))  # the names end in a sortable timestamp
    try:
        entries = json.loads(states[-1].read_text(encoding="utf-8"))["trial_data"]
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return {}
    trials = [p.name for p in folder.iterdir() if p.is_dir()]
    named: dict[str, set[str]] = {}
    for entry in entries if isinstance(entries, list) else []:
        text = json.dumps(entry)
        for trial in (t for t in trials if t in text):
            named.setdefault(trial, set()).update(CHECKPOINT_NAME.findall(text))
    return named


def restore_blockers(folder: Path) -> list[str]:
    """Why `folder` must not be restored; empty when it may."""
    unsafe = unsafe_files(folder)
    if unsafe:
        return [f"not restoring a Tune experiment another user could have written: {u}"
                for u in unsafe]
    return [f"checkpoint {c} is gone; its trial starts afresh in the same run"
            for c in missing_checkpoints(folder)]


__all__ = ["missing_checkpoints", "restore_blockers", "unsafe_files"]
