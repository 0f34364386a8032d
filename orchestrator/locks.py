"""File locks the kernel releases when their holder dies, so a crashed process never leaves one
stale: one launch per sweep at a time, and one creator of a fresh embedded MLflow store.

The locks are `flock`s on files under the service's home; they guard this machine (every
launch of a sweep on a shared home folder included), not launches on other machines.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SweepLockedError(RuntimeError):
    """Another live process is launching the same sweep."""


def _acquire(path: Path, blocking: bool) -> int:
    """An open descriptor holding an exclusive flock on `path` (created if needed); raises
    BlockingIOError when `blocking` is False and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold the lock on `path` for the block, waiting for it if needed."""
    fd = _acquire(path, blocking=True)
    try:
        yield
    finally:
        os.close(fd)  # closing drops the lock; so does the death of the process


@contextmanager
def sweep_lock(name: str, home: Path) -> Iterator[None]:
    """Refuse at once (SweepLockedError, naming the holder) while another process launches
    sweep `name` from this home; else hold the lock until the block ends."""
    path = _lock_path(name, home)
    try:
        fd = _acquire(path, blocking=False)
    except BlockingIOError:
        raise SweepLockedError(
            f"sweep {name!r} is being launched already ({_holder(path)}); wait for it to "
            f"finish, or stop it (mim4dd-sweep stop {name}) and launch again: it resumes"
        ) from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def running_launch(name: str, home: Path) -> dict | None:
    """The holder (pid, host, since) of sweep `name`'s lock while a live process holds it;
    None when no launch of it runs (the file of a finished one may remain)."""
    path = _lock_path(name, home)
    if not path.exists():
        return None
    try:
        fd = _acquire(path, blocking=False)
    except BlockingIOError:  # held: a launch is running
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    os.close(fd)
    return None


def stop_launch(name: str, home: Path) -> int:
    """Ask the launch of sweep `name` running on this machine to stop (SIGTERM, which a launch
    handles as Ctrl-C); returns its pid. LookupError when there is none to stop here."""
    holder = running_launch(name, home)
    if holder is None:
        raise LookupError(f"no launch of sweep {name!r} is running from {home}")
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        raise LookupError(f"sweep {name!r} runs on {holder.get('host', 'another machine')}: "
                          "stop it there (Ctrl-C, or mim4dd-sweep stop)")
    os.kill(holder["pid"], signal.SIGTERM)
    return holder["pid"]


def stop_on_sigterm() -> None:
    """The receiving side of `stop_launch`, and of `timeout`, `kill` and job schedulers: stop
    as on Ctrl-C (Tune's own SIGINT handling when it runs), so runs end KILLED and a relaunch
    resumes them."""
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))


def _lock_path(name: str, home: Path) -> Path:
    return home / "locks" / f"{name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"lock {path}"


__all__ = ["SweepLockedError", "held", "running_launch", "stop_launch", "stop_on_sigterm",
           "sweep_lock"]
