"""Stopping process trees the tests start (Ray puts its workers in their own process groups,
so a process group kill misses them; the session id of each /proc entry does not)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

HAS_PROC = Path("/proc/self/stat").exists()


def session_pids(session: int) -> list[int]:
    """Live processes whose session id is `session`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(stat.parent.name))
    return pids


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session and everything in its session."""
    for _ in range(50):
        pids = session_pids(process.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    process.wait()


def stop(process: subprocess.Popen) -> None:
    """Ask a process started in its own session to stop, then kill whatever is left of it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    kill_session(process)
