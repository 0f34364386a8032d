"""All-or-nothing file writes: a crash leaves the old file or none, never half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def stage(directory: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write a file next to its destination under a temporary name and flush it to disk.

    The caller renames it into place (`os.replace`), possibly after staging its siblings.
    """
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); the finished file is as readable as any the
        # user creates (their umask), so colleagues on a shared volume can read sets and buffers.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write` the file to a temporary name beside `path`, then rename it into place."""
    os.replace(stage(path.parent, path.name, write), path)
