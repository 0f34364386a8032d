"""A home the sweep service cannot write: a full disk and a read-only file system, made real
with a small tmpfs (mounting needs root, as CI runs; elsewhere these tests skip). Root ignores
file permissions, so only a read-only mount or a full one refuses it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import tracking
from orchestrator.cli import app
from sweep_helpers import write_spec


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
            capture_output=True, check=False).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _home_on(disk: Path, template_db: Path, monkeypatch) -> Path:
    home = disk / "home"
    home.mkdir()
    shutil.copy(template_db, home / "mlflow.db")
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _one_line(result) -> str:
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    return line


def test_a_read_only_home_is_read_and_a_launch_is_one_line(small_disk, template_db, tmp_path,
                                                           monkeypatch):
    # Before: launch printed 62 lines of traceback ending in OSError: [Errno 30].
    home = _home_on(small_disk, template_db, monkeypatch)
    spec = write_spec(tmp_path / "ro.yaml", "ro", {"lam": [0]})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    listed = CliRunner().invoke(app, ["list"])  # readers take no write lock
    assert listed.exit_code == 0, listed.output
    assert "no sweep named 'ro'" in _one_line(CliRunner().invoke(app, ["status", "ro"]))
    line = _one_line(CliRunner().invoke(app, ["launch", str(spec)]))
    assert line.startswith(f"cannot write {home}"), line
    assert "the file system is read-only" in line and "run it again" in line
    mtt = write_spec(tmp_path / "mtt.yaml", "mtt", {"lam": [0]}, base={"base": "mtt"})
    line = _one_line(CliRunner().invoke(app, ["experts", str(mtt)]))
    assert line.startswith("not started: cannot write ") and "read-only" in line, line


def test_a_full_disk_stops_a_launch_with_one_line(small_disk, template_db, tmp_path,
                                                   monkeypatch):
    # Before: 524 lines of SQLAlchemy traceback ending in "database or disk is full".
    home = _home_on(small_disk, template_db, monkeypatch)
    spec = write_spec(tmp_path / "full.yaml", "full", {"lam": [0]})
    with open(small_disk / "filler", "wb") as filler, pytest.raises(OSError):
        for _ in range(64):  # 4 MiB: more than the disk holds
            filler.write(b"\0" * 65536)
            filler.flush()

    line = _one_line(CliRunner().invoke(app, ["launch", str(spec)]))
    assert line.startswith("cannot write "), line
    assert str(home) in line and "the disk is full" in line and "run it again" in line
    (small_disk / "filler").unlink()  # space again: the same launch now starts (dry run)
    assert CliRunner().invoke(app, ["launch", str(spec), "--dry-run"]).exit_code == 0
