"""One launch per sweep at a time, never a stale lock; a fresh MLflow store created by several
processes at once. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
from typer.testing import CliRunner  # noqa: E402

from orchestrator import service, tracking  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.locks import SweepLockedError, sweep_lock  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _hold_lock(name: str, home: Path) -> subprocess.Popen:
    """A separate process that takes the sweep's lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from orchestrator.locks import sweep_lock
        with sweep_lock({name!r}, Path({str(home)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_launch_refuses_at_once_and_a_dead_holder_leaves_no_lock(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "busy.yaml"
    path.write_text(yaml.safe_dump({"name": "busy", "engine": {"dataset": "digits"},
                                    "grid": {"lam": [0]}}))
    holder = _hold_lock("busy", home)
    try:
        with pytest.raises(SweepLockedError, match=f"process {holder.pid} on "):
            service.launch(load_spec(path), progress=False)
        result = CliRunner().invoke(app, ["launch", str(path)])
        assert result.exit_code == 1 and "being launched already" in result.output
        assert not (home / "mlflow.db").exists()  # refused before anything was created
        with sweep_lock("other", home):  # other sweeps are not held up
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
        holder.wait()
    with sweep_lock("busy", home):  # the kernel dropped the dead holder's lock
        pass


CREATE = textwrap.dedent("""
    import sys
    from orchestrator import tracking
    client = tracking.connect(sys.argv[1])
    client.create_experiment(sys.argv[2])
""")


@pytest.mark.slow
def test_a_fresh_store_created_by_several_processes_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, uri, f"exp{i}"], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)
    names = {e.name for e in tracking.connect(uri).search_experiments()}
    assert {"exp0", "exp1", "exp2"} <= names
