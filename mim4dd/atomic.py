"""All-or-nothing file writes: a crash leaves the old file or none, never half a file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def stage(directory: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write a file next to its destination under a temporary name and flush it to disk.

    The caller renames it into place (`os.replace`), possibly after staging its siblings.
    """
    tmp = _create_unique(directory, name)
    mode = tmp.stat().st_mode & 0o777  # what the kernel gave a new file of this user
    try:
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) make the file anew, private
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _create_unique(directory: Path, name: str) -> Path:
    """A new empty file with a fresh name. Created like any file the user makes (0666 less
    their umask, applied by the kernel), not mkstemp's private 0600, so colleagues on a shared
    volume can read the sets and buffers it becomes."""
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer's name: draw again
            continue


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write` the file to a temporary name beside `path`, then rename it into place."""
    os.replace(stage(path.parent, path.name, write), path)
