"""Whether a Tune experiment folder may be restored: whole, and written only by this user.

`Tuner.restore` unpickles the folder's state files, so a folder another user could have
written is never restored (any such file could run code here); and a trial whose newest
checkpoint folder is gone would fail every relaunch with "Could not recover from checkpoint",
so such a folder is set aside and the trials start afresh in their same MLflow runs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

RESULTS_FILE = "result.json"  # Tune's per-trial result rows (JSON lines)
CHECKPOINT_KEY = "checkpoint_dir_name"  # in a row that came with a checkpoint


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
    """Trial folders whose newest reported checkpoint folder no longer exists."""
    missing = []
    for results in sorted(folder.glob(f"*/{RESULTS_FILE}")):
        newest = None
        try:
            with open(results, encoding="utf-8") as rows:
                for line in rows:
                    try:
                        newest = json.loads(line).get(CHECKPOINT_KEY) or newest
                    except (ValueError, AttributeError):
                        continue  # a row cut short by a kill
        except OSError:
            continue
        if newest and not (results.parent / newest).is_dir():
            missing.append(f"{results.parent.name}/{newest}")
    return missing


def restore_blockers(folder: Path) -> list[str]:
    """Why `folder` must not be restored; empty when it may."""
    unsafe = unsafe_files(folder)
    if unsafe:
        return [f"not restoring a Tune experiment another user could have written: {u}"
                for u in unsafe]
    return [f"checkpoint {c} is gone; its trial starts afresh in the same run"
            for c in missing_checkpoints(folder)]


__all__ = ["missing_checkpoints", "restore_blockers", "unsafe_files"]
