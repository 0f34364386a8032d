"""`mim4dd-sweep ui --open`: open the printed link in the user's browser once the UI answers.

`ui` replaces its own process with MLflow's (so Ctrl-C stops the UI directly), so the waiting
is done by a small detached process: it polls the server's /health, then calls Python's
`webbrowser.open` (which honours $BROWSER), and gives up quietly if the UI never answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import webbrowser

WAIT_S = 120.0  # a cold MLflow UI took ~10 s to answer on the 2-core development machine


def open_when_up(base_url: str, link: str) -> subprocess.Popen:
    """Start the detached opener of `link` for the UI at `base_url`; returns at once."""
    return subprocess.Popen([sys.executable, "-m", __name__, base_url, link],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_then_open(base_url: str, link: str, timeout: float = WAIT_S) -> bool:
    """Open `link` as soon as `base_url` answers; False when it did not within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=2):
                return webbrowser.open(link)
        except OSError:  # not listening yet (URLError and timeouts are OSErrors)
            time.sleep(0.5)
    return False


if __name__ == "__main__":
    sys.exit(0 if wait_then_open(sys.argv[1], sys.argv[2]) else 1)
