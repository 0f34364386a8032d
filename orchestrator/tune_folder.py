"""The checkpoints a sweep's earlier launches left, and whether their folder may be read.

Each launch writes its own Tune experiment folder under the sweep's; a relaunch resumes each
trial from the newest of our checkpoints of its current config in any of them
(`resumable_checkpoints`). Nothing here is unpickled, and a folder another user could have
written is not read at all.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"checkpoint_\d{6}")
# In each of our checkpoints, beside the engine state: which trial (key, config digest, MLflow
# run) wrote it, at which iteration and after how many evaluation networks.
TRIAL_FILE = "trial.json"


def unsafe_files(folder: Path) -> list[str]:
    """Paths in `folder` that are links, are not owned by this user, or that group or others
    may write (a checkpoint's state decides what a trial resumes from)."""
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


def resumable_checkpoints(folder: Path, digests: dict[str, str]) -> dict[str, list[str]]:
    """Per trial key, the checkpoint folders under `folder` written for that key's current
    config digest (`digests`), newest first: by iteration, then by evaluation networks done.
    None from a folder another user could have written."""
    if not folder.is_dir() or unsafe_files(folder):
        return {}
    found: dict[str, list[tuple[int, int, str]]] = {}
    # <launch>/<trial>/checkpoint_*/ since launches have folders of their own; <trial>/... in a
    # sweep folder an older mim4dd wrote
    for info_file in folder.rglob(TRIAL_FILE):
        if not CHECKPOINT_NAME.fullmatch(info_file.parent.name):
            continue
        try:
            info = json.loads(info_file.read_text())
            key, rank = info["key"], (int(info["iteration"]), int(info.get("networks", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # cut short by a kill, or written by an older mim4dd
        if digests.get(key) is not None and info.get("digest") == digests[key]:
            found.setdefault(key, []).append((*rank, str(info_file.parent)))
    return {key: [path for *_, path in sorted(rows, reverse=True)] for key, rows in found.items()}


__all__ = ["TRIAL_FILE", "resumable_checkpoints", "unsafe_files"]
