"""Whether a Tune experiment folder may be restored: whole, and written only by this user.

`Tuner.restore` unpickles the folder's state files, so a folder another user could have
written is never restored (any such file could run code here); and a trial whose newest
checkpoint folder is gone would fail every relaunch with "Could not recover from checkpoint",
so such a folder is set aside and its trials go on in their same MLflow runs.

Tune's view of a killed sweep can lag its files: the driver deletes a trial's older checkpoint
when it registers the newer one, and saves the state naming the newer one a moment later. So a
trial resumes from the newest of our checkpoints left on disk (`resumable_checkpoints`), not
only from the one Tune names.
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
# In each of our checkpoints, beside the engine state: which trial (key, config digest, MLflow
# run) wrote it, at which iteration and after how many evaluation networks.
TRIAL_FILE = "trial.json"


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
    return [f"checkpoint {c} is gone; its trial goes on in the same run, from the newest "
            f"checkpoint it left if any" for c in missing_checkpoints(folder)]


def resumable_checkpoints(folder: Path, digests: dict[str, str]) -> dict[str, list[str]]:
    """Per trial key, the checkpoint folders under `folder` written for that key's current
    config digest (`digests`), newest first: by iteration, then by evaluation networks done.
    None from a folder another user could have written."""
    if not folder.is_dir() or unsafe_files(folder):
        return {}
    found: dict[str, list[tuple[int, int, str]]] = {}
    for info_file in folder.glob(f"*/checkpoint_*/{TRIAL_FILE}"):
        try:
            info = json.loads(info_file.read_text())
            key, rank = info["key"], (int(info["iteration"]), int(info.get("networks", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # cut short by a kill, or written by an older mim4dd
        if digests.get(key) is not None and info.get("digest") == digests[key]:
            found.setdefault(key, []).append((*rank, str(info_file.parent)))
    return {key: [path for *_, path in sorted(rows, reverse=True)] for key, rows in found.items()}


__all__ = ["TRIAL_FILE", "missing_checkpoints", "restore_blockers", "resumable_checkpoints",
           "unsafe_files"]
