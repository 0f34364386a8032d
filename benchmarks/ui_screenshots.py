"""Screenshots of what a newcomer sees in the MLflow UI after a sweep (issue 11): not a timing.

It launches a tiny real sweep (scikit-learn's digits, λ ∈ {0, 0.8} × 3 seeds, seconds per
trial) with `mim4dd-sweep launch` into a fresh store, serves that store with the `mlflow
server` line `mim4dd-sweep ui` runs (on 127.0.0.1), opens the sweep's deep link in headless
Chromium and saves:

* ``runs_table.png``: the link's runs table (the sweep's saved view: sorted by λ, with λ,
  seed, accuracy, dataset and git version columns), ``runs_charts.png`` its chart view of
  the accuracy (one bar per trial: logged at step 0);
* ``parent_overview.png``: the parent run's description, per-cell metrics (mean ± std and
  the paired difference from λ = 0), source and grid params; ``parent_table.png`` its
  `aggregate/summary.json` as the UI shows a logged table; ``parent_plot.png`` the plot;
* ``child_overview.png``: a trial's description, metrics, dataset inputs, source and tags;
* ``child_image_chart.png`` and ``child_image_artifact.png``: its synthetic set as an image
  (the logged image, and the set's grid.png artifact); ``child_system_metrics.png``.

Needs Chromium (`apt-get install chromium`) and the `playwright` package (`pip install
playwright`; its own browser download is not needed). Everything goes under ``--out``
(default /tmp/mim4dd-ui-screenshots), outside the repository:

    .venv/bin/python benchmarks/ui_screenshots.py [--out DIR] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "ui-demo"
LAM, SEED = "lam", "seed"
PREVIEW = "synthetic_set"  # orchestrator.trial_run.PREVIEW_KEY


def write_sweep(folder: Path) -> Path:
    spec = {
        "name": SWEEP, "experiment": "mim4dd-ui-demo",
        "description": "Screenshot sweep: λ 0 vs 0.8 on scikit-learn's 8x8 digits.",
        "engine": {"dataset": "digits", "ipc": 2, "iterations": 100, "batch_real": 16,
                   "model": {"width": 8}, "eval": {"epochs": 50, "lr": 0.1, "num_nets": 3}},
        "grid": {LAM: [0, 0.8], SEED: [0, 1, 2]},
        "max_concurrent": 2, "checkpoint_every": 20,
    }
    path = folder / "ui-demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path


def launch(home: Path, sweep_file: Path) -> None:
    env = {**os.environ, "MIM4DD_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}  # trials of seconds: sample often
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", str(sweep_file)],
                   cwd=ROOT, env=env, check=True)
    print(f"sweep finished in {time.monotonic() - started:.0f} s", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on the sweep's store, as `mim4dd-sweep ui` starts it (`mlflow ui`)."""
    from orchestrator import queries, tracking

    os.environ[tracking.HOME_ENV] = str(home)
    port = free_port()
    command = queries.ui_command(None, "127.0.0.1", port)
    command[command.index("ui")] = "server"
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    raise SystemExit(f"mlflow server did not start:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mim4dd-ui-screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the store of an earlier run in --out (no new sweep)")
    args = parser.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("needs playwright: .venv/bin/pip install playwright") from None
    if not Path(args.chromium).exists():
        raise SystemExit(f"no Chromium at {args.chromium}: apt-get install chromium")
    out = args.out.resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"{out} is inside the repository; screenshots stay out of git")
    home = out / "home"
    if not (args.reuse and (home / "mlflow.db").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        home.mkdir(parents=True)
        launch(home, write_sweep(out))
    server, url = serve(home, out / "server.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1700, "height": 950})
            shots = take(page, url, out)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server, its workers and job consumers
        server.wait(timeout=30)
    print("\n".join(str(path) for path in shots))


def settle(page, text: str, seconds: float = 2) -> None:
    """Wait for `text` (or a field with that placeholder) on the page, then for charts and
    images to draw; close MLflow's assistant panel, which would cover a third of a shot."""
    page.get_by_text(text).or_(page.get_by_placeholder(text)).first.wait_for(timeout=60_000)
    time.sleep(seconds)
    close = page.locator("[aria-label=Close]")
    if close.count() and close.first.is_visible():
        close.first.click()
        time.sleep(0.5)


def take(page, url: str, out: Path) -> list[Path]:
    from orchestrator import queries, tracking, ui_view

    client = tracking.connect(tracking.resolve_tracking_uri())
    parent = tracking.find_sweep_run(client, SWEEP)
    children = tracking.child_runs(client, parent)
    child = next(r for r in children if r.data.tags[tracking.TAG_KEY] == "lam=0.8,seed=0")
    # A trial shorter than the sampling interval has no system metrics: show one that has.
    sampled = next((r for r in children if "system/cpu_utilization_percentage" in
                    r.data.metrics), child)
    runs = f"{url}/#/experiments/{parent.info.experiment_id}/runs"
    layout = f"?{ui_view.TRAINING_LAYOUT}"  # a run page opened by URL, in the training layout
    shots = []

    def shot(name: str) -> None:
        shots.append(out / name)
        page.screenshot(path=shots[-1], full_page=True)

    def search_charts(text: str) -> None:
        page.get_by_placeholder("Search metric charts").fill(text)
        time.sleep(3)

    def open_artifact(run_id: str, folder: str, name: str) -> None:
        """A run's artifacts tab, with `folder/name` open in its preview pane."""
        page.goto(f"{runs}/{run_id}/artifacts{layout}")
        settle(page, folder)
        page.get_by_text(folder, exact=True).first.click()
        page.get_by_text(name, exact=True).first.click()
        time.sleep(3)

    link = queries.sweep_link(SWEEP, url)  # what `mim4dd-sweep ui ui-demo` prints
    print(f"deep link: {link}", flush=True)
    page.goto(link)
    settle(page, "lam=0.8,seed=2")
    shot("runs_table.png")
    page.locator("label:has(input[value=CHART])").click()  # the table's chart view
    settle(page, "Search metric charts")
    search_charts("test_acc_mean_pct")
    shot("runs_charts.png")

    page.goto(f"{runs}/{parent.info.run_id}{layout}")
    settle(page, "Metrics (")
    page.get_by_text("Show more").first.click()
    time.sleep(1)
    shot("parent_overview.png")
    open_artifact(parent.info.run_id, "aggregate", "summary.json")
    shot("parent_table.png")
    page.get_by_text("accuracy_vs_lam.png", exact=True).first.click()
    time.sleep(3)
    shot("parent_plot.png")

    page.goto(f"{runs}/{child.info.run_id}{layout}")
    settle(page, "Metrics (")
    shot("child_overview.png")
    page.goto(f"{runs}/{child.info.run_id}/model-metrics{layout}")
    settle(page, "Search metric charts")
    search_charts(PREVIEW)
    page.locator("[data-component-id=fullscreen_button_chartcard]").first.click()
    time.sleep(2)
    page.locator("img").last.scroll_into_view_if_needed()  # below the run's params
    time.sleep(2)
    shot("child_image_chart.png")
    open_artifact(child.info.run_id, "synset", "grid.png")
    shot("child_image_artifact.png")
    page.goto(f"{runs}/{sampled.info.run_id}/system-metrics{layout}")
    settle(page, "Search metric charts", 4)
    shot("child_system_metrics.png")
    return shots


if __name__ == "__main__":
    main()
