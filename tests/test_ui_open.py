"""`mim4dd-sweep ui SWEEP --open`: the real CLI serves the store and, once the UI answers, opens
the sweep's deep link in the browser that $BROWSER names (a script that records its call)."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys

import pytest

pytest.importorskip("mlflow")
from processes import kill_session  # noqa: E402
from sweep_helpers import ROOT, cli, cli_env, wait_for  # noqa: E402

from orchestrator import tracking, ui_view  # noqa: E402

# The "browser": records the URL it was given and whether the UI answered at that moment.
BROWSER = """#!{python}
import sys, urllib.request
with urllib.request.urlopen("{base}/health", timeout=5) as answer:
    status = answer.status
open({record!r}, "w").write(f"{{status}} {{sys.argv[1]}}")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a cold MLflow UI: 10-30 s to answer
def test_ui_open_opens_the_deep_link_once_the_ui_answers(home, tmp_path):
    client = tracking.connect(tracking.resolve_tracking_uri())
    experiment_id = tracking.ensure_experiment(client, "ui-open", tracking.resolve_tracking_uri())
    ui_view.save(client, experiment_id, "demo", ["lam", "seed"])
    tracking.open_sweep_run(client, experiment_id, "demo", {})
    port, record = _free_port(), tmp_path / "opened.txt"
    base = f"http://127.0.0.1:{port}"
    browser = tmp_path / "browser.py"
    browser.write_text(BROWSER.format(python=sys.executable, base=base, record=str(record)))
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)

    env = {**cli_env(home), "BROWSER": str(browser)}
    ui = subprocess.Popen(cli("ui", "demo", "--open", "--port", str(port)), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        printed = ui.stdout.readline().strip()
        opened = wait_for(lambda: record.is_file() and record.read_text(), 120, "the browser")
    finally:
        kill_session(ui)
    link = f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey=mim4dd-demo"
    assert printed.startswith(f"sweep demo: {link}")
    assert opened == f"200 {printed.removeprefix('sweep demo: ')}"

