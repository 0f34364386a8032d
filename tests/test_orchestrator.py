"""The sweep service end to end: real Ray Tune, real MLflow, tiny real data.

One local Ray cluster serves the in-process tests of this module; every test gets its own
MLflow store (MIM4DD_HOME in tmp_path). Trials distill scikit-learn's 8x8 digits with an
8-channel ConvNet for a handful of iterations, so each takes about a second of compute.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow.entities import Metric  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mim4dd.config import Config  # noqa: E402
from mim4dd.experiment import evaluate_synset, run_experiment  # noqa: E402
from mim4dd.metrics import TEST_ACC_MEAN, TEST_ACC_STD, net_metric  # noqa: E402
from mim4dd.synset import SyntheticSet  # noqa: E402
from orchestrator import lineage, queries, service, tracking, trainable, trial_run  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from sweep_helpers import (  # noqa: E402
    ROOT, cli, cli_env, log_one_dataset_at_once, sweep_runs, wait_for, write_spec,
)


def net_accuracies(run) -> list[float]:
    """The trial's per-network test accuracies, in percent as logged."""
    return [run.data.metrics[net_metric("test", i)] for i in range(2)]


@pytest.mark.slow
def test_grid_sweep_end_to_end(ray_cluster, home, tmp_path):
    sweep_file = write_spec(tmp_path / "grid.yaml", "grid", {"lam": [0, 0.8], "seed": [0, 1]},
                            checkpoint_every=3, max_concurrent=2, report_every_s=3600)
    spec = load_spec(sweep_file)
    outcome = service.launch(spec, progress=False, source=sweep_file)

    assert outcome.status == "FINISHED"
    assert sorted(outcome.finished) == sorted(t.key for t in spec.trials())
    assert not outcome.failed and not outcome.unfinished

    uri = tracking.resolve_tracking_uri()
    assert uri == f"sqlite:///{home / 'mlflow.db'}"
    client, parent, children = sweep_runs(uri, "grid")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_ROLE] == "sweep"
    assert parent.data.tags[tracking.TAG_FINISHED] == "4"
    assert client.get_experiment(parent.info.experiment_id).name == "mim4dd"
    assert len(children) == 4
    assert sorted(r.data.tags[tracking.TAG_KEY] for r in children) == sorted(outcome.finished)
    # what the parent shows in the MLflow UI: the grid, where it came from, what it is
    assert parent.data.params == {"grid.lam": "[0, 0.8]", "grid.seed": "[0, 1]"}
    assert parent.data.tags["mlflow.source.name"] == str(sweep_file)
    if (ROOT / ".git").exists():  # a clone: the commit the code ran at
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert parent.data.tags["mlflow.source.git.commit"] == head
        assert children[0].data.tags["mlflow.source.git.commit"] == head
    assert "`diff_vs_lam0_mean_pct`" in parent.data.tags[tracking.TAG_NOTE]
    logged_file = client.download_artifacts(parent.info.run_id, "sweep.yaml", str(tmp_path))
    assert Path(logged_file).read_text() == sweep_file.read_text()
    digests = set()
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert tags[tracking.TAG_PARENT] == parent.info.run_id
        assert tags[tracking.TAG_SWEEP] == "grid"
        assert tags["mim4dd.version.torch"] and tags["mim4dd.version.ray"] == ray.__version__
        assert tags["mim4dd.version.mlflow"] and tags["mim4dd.version.mim4dd"]
        assert tracking.TAG_FAILURE not in tags
        # the full resolved config, flattened with dotted keys
        assert params["dataset"] == "digits" and params["eval.epochs"] == "30"
        assert params["model.width"] == "8" and params["lr_milestones"] == "[1800, 2800]"
        lam = float(params["lam"])
        assert tags[tracking.TAG_KEY] == f"lam={lam:g},seed={params['seed']}"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 7))
        assert "iteration" not in metrics and tags[tracking.TAG_ITERATION] == "6"
        assert ("loss_mim" in metrics) == (lam > 0) and ("loss_mim_block3" in metrics) == (lam > 0)
        assert "loss_base" in metrics
        accs = net_accuracies(run)
        results = json.loads(Path(client.download_artifacts(
            run.info.run_id, "results.json", str(tmp_path / run.info.run_id))).read_text())
        assert accs == pytest.approx([100 * a for a in results["evaluation"]["test_accuracies"]])
        assert metrics[TEST_ACC_MEAN] == pytest.approx(np.mean(accs))
        assert metrics[TEST_ACC_STD] == pytest.approx(np.std(accs))
        assert {net_metric("val", 0), net_metric("val", 1)} <= set(metrics)
        assert metrics["peak_rss_mb"] > 100  # a worker with torch loaded: hundreds of MB
        # once, at step 0: runs compare as bars, not as dots at their last step
        assert [m.step for m in client.get_metric_history(run.info.run_id, TEST_ACC_MEAN)] == [0]
        assert f"`lam={lam:g},seed={params['seed']}` of sweep **grid**" in tags[tracking.TAG_NOTE]
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation", "test"}
        assert {d.name for d in inputs.values()} == {"digits"}
        digests.add(tuple(inputs[c].digest for c in ("training", "validation", "test")))
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert names == {"synset", "results.json", "images"}
        preview = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert any(p.startswith(f"images/{trial_run.PREVIEW_KEY}+step+0") and p.endswith(".png")
                   for p in preview), preview
        synset_files = {a.path for a in client.list_artifacts(run.info.run_id, "synset")}
        assert synset_files == {"synset/synset.safetensors", "synset/manifest.json",
                                "synset/grid.png"}
    assert len(digests) == 1  # one dataset, split alike: one digest per split for all trials
    # Progress reached Tune at iteration 1 and at the checkpoints (3, 6) only: report_every_s
    # is an hour (each evaluation network and the result report at iteration 6 too).
    results = sorted((home / "ray_results" / "grid").glob("*/*/result.json"))
    assert len(results) == 4
    for result in results:
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        assert sorted({row["iteration"] for row in rows}) == [1, 3, 6], result

    # the aggregate: by hand from the logged per-network accuracies
    expected, seed_means = {}, {}
    for lam in (0.0, 0.8):
        runs = sorted((r for r in children if float(r.data.params["lam"]) == lam),
                      key=lambda r: int(r.data.params["seed"]))
        seed_means[lam] = per_seed = [np.mean(net_accuracies(r)) for r in runs]
        pooled = [a for r in runs for a in net_accuracies(r)]
        val = [r.data.metrics["eval/val_acc_mean_pct"] for r in runs]
        expected[lam] = [2, 4, np.mean(per_seed), np.std(per_seed), np.mean(pooled),
                         np.std(pooled), np.mean(val), np.std(val), 0, 0, np.nan, np.nan, np.nan,
                         *[np.nan] * 4]  # no random-real baseline in this sweep
    # the validation split (never the test split) picks one lambda
    expected[max(expected, key=lambda lam: expected[lam][6])][8] = 1
    # lam 0.8 against the same seeds at lam 0: paired, Student t with 1 degree of freedom
    diffs = np.subtract(seed_means[0.8], seed_means[0.0])
    half = 12.7062047 * np.std(diffs, ddof=1) / np.sqrt(2)
    expected[0.8][9:13] = [2, np.mean(diffs), np.mean(diffs) - half, np.mean(diffs) + half]
    columns = ["lam", "n_seeds", "n_nets", "seed_level_mean_pct", "seed_level_std_pct",
               "pooled_mean_pct", "pooled_std_pct", "val_mean_pct", "val_std_pct",
               "chosen_on_val", "n_pairs", "diff_vs_lam0_mean_pct", "diff_vs_lam0_ci95_low_pct",
               "diff_vs_lam0_ci95_high_pct"]
    baseline = ["random_mean_pct", "random_std_pct", "diff_vs_random_mean_pct",
                "diff_vs_random_std_pct"]
    # In memory the baseline's columns are there (empty); the files leave them out.
    logged = _logged_summary(client, parent.info.run_id, tmp_path)
    for summary, shown in ((outcome.summary, columns + baseline), (logged, columns)):
        assert list(summary.columns) == shown
        for row in summary.to_dict("records"):
            assert list(row.values())[1:] == pytest.approx(expected[row["lam"]][:len(shown) - 1],
                                                           nan_ok=True)
    parent = client.get_run(parent.info.run_id)  # its metrics: every number of the table
    assert parent.data.metrics["cell/lam_0.8/diff_vs_lam0_mean_pct"] == pytest.approx(
        np.mean(diffs))
    assert parent.data.metrics["cell/lam_0/seed_level_std_pct"] == pytest.approx(expected[0][3])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "aggregate")}
    assert {"aggregate/summary.csv", "aggregate/summary.md", "aggregate/trials.csv",
            "aggregate/accuracy_vs_lam.png", "aggregate/summary.json"} <= artifacts

    # pull by run id (API) and by grid values (CLI); both verified and loadable
    target = next(r for r in children if r.data.tags[tracking.TAG_KEY] == "lam=0.8,seed=1")
    folder = queries.pull(target.info.run_id, tmp_path / "pulled")
    dataset = SyntheticSet.load(folder).to_dataset()
    assert len(dataset) == 10 and dataset[0][0].shape == (1, 8, 8)
    _assert_the_engine_reproduces(target, SyntheticSet.load(folder))
    result = CliRunner().invoke(app, ["pull", "grid", "--lam", "0.8", "--seed", "1",
                                      "--out", str(tmp_path / "cli-pulled")])
    assert result.exit_code == 0, result.output
    assert target.info.run_id in result.output and "SyntheticSet.load(" in result.output
    assert SyntheticSet.load(tmp_path / "cli-pulled").manifest["config"]["lam"] == 0.8
    pull_again = ["pull", "grid", "--lam", "0", "--seed", "1", "--out", str(tmp_path / "cli-pulled")]
    refused = CliRunner().invoke(app, pull_again)
    assert refused.exit_code == 1 and "not empty; pass --force" in refused.output
    assert SyntheticSet.load(tmp_path / "cli-pulled").manifest["config"]["lam"] == 0.8
    assert CliRunner().invoke(app, [*pull_again, "--force"]).exit_code == 0
    assert SyntheticSet.load(tmp_path / "cli-pulled").manifest["config"]["lam"] == 0

    # status and report read the same store
    status = CliRunner().invoke(app, ["status", "grid"])
    assert status.exit_code == 0 and "4/4 done" in status.output, status.output
    # the link opens the sweep's saved view: its runs sorted by lam, lam/seed/accuracy columns
    link = queries.sweep_link("grid", "http://127.0.0.1:5000/")
    assert link == (f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs"
                    "?viewStateShareKey=mim4dd-grid&workflowType=machine_learning")
    experiment = client.get_experiment(parent.info.experiment_id)
    view = json.loads(experiment.tags["mlflow.sharedViewState.mim4dd-grid"])
    state = json.loads(zlib.decompress(base64.b64decode(view["state"].removeprefix("deflate;"))))
    assert state["orderByKey"] == "params.`lam`" and state["searchFilter"].endswith("'grid'")
    assert {"params.`lam`", "params.`seed`", f"metrics.`{TEST_ACC_MEAN}`"} <= set(
        state["selectedColumns"])
    kind = experiment.tags[tracking.TAG_EXPERIMENT_KIND]
    assert kind == "custom_model_development"  # MLflow 3 opens its runs table, not GenAI
    [listed] = queries.list_sweeps()
    assert (listed["sweep"], listed["status"], listed["finished"]) == ("grid", "FINISHED", "4/4")
    assert "grid" in CliRunner().invoke(app, ["list"]).stdout
    report = CliRunner().invoke(app, ["report", "grid"])
    assert report.exit_code == 0 and "seed-level" in report.output, report.output
    # not a terminal: the table at full width, every header on one line, the legend without
    # the random-baseline columns this sweep does not have
    assert "test acc % seed-level (mean ± std)" in report.output
    assert "random:" not in report.output
    as_csv = CliRunner().invoke(app, ["report", "grid", "--format", "csv"])
    assert as_csv.exit_code == 0, as_csv.output
    table = pd.read_csv(io.StringIO(as_csv.output))
    assert sorted(table["lam"]) == [0, 0.8] and set(table["n_seeds"]) == {2}
    written = CliRunner().invoke(app, ["report", "grid", "--format", "json", "--out",
                                       str(tmp_path / "report.json")])
    assert written.exit_code == 0, written.output
    rows = json.loads((tmp_path / "report.json").read_text())
    expected = list(table["seed_level_mean_pct"])
    assert [r["seed_level_mean_pct"] for r in rows] == pytest.approx(expected)

    assert "Δ vs λ = 0" in report.output and "baseline" in report.output

    # a relaunch of a finished sweep re-runs nothing and adds no run
    again = service.launch(spec, progress=False)
    assert sorted(again.skipped) == sorted(outcome.finished) and again.status == "FINISHED"
    assert len(sweep_runs(uri, "grid")[2]) == 4
    assert len(tracking.search_all(client, [parent.info.experiment_id],
                                   "tags.`mim4dd.role` = 'sweep'")) == 1
    # the MLflow table is replaced, not appended to (MLflow's log_table appends)
    table = client.download_artifacts(parent.info.run_id, "aggregate/summary.json",
                                      str(tmp_path / "again"))
    assert len(pd.read_json(table, orient="split")) == 2
    parent = client.get_run(parent.info.run_id)
    assert tracking.TAG_STALE_PARAMS not in parent.data.tags
    # each launch logs the parent's numbers at its own step: one value per (metric, step)
    assert parent.data.tags[tracking.TAG_LAUNCH] == "2"
    for name in parent.data.metrics:
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, name)]
        assert sorted(steps) == [1, 2], (name, steps)


def _logged_summary(client, run_id: str, tmp_path: Path) -> pd.DataFrame:
    path = client.download_artifacts(run_id, "aggregate/summary.csv", str(tmp_path))
    return pd.read_csv(path)


def _assert_the_engine_reproduces(run, pulled: SyntheticSet) -> None:
    """The trial's config through the bare engine, in one thread as the trial ran (CPU: a
    deterministic setting), gives the very set and accuracies the service logged; the pulled
    set, evaluated again, gives them too."""
    config = Config.from_saved(pulled.manifest["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_experiment(config)
        reevaluated = evaluate_synset(pulled, config)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again.synset.images, pulled.images)
    for evaluation in (again.evaluation, reevaluated):
        metrics = evaluation.metrics()
        assert metrics == {name: run.data.metrics[name] for name in metrics}


@pytest.mark.slow
def test_failing_trial_does_not_stop_the_sweep(ray_cluster, home, tmp_path):
    # lr_img 1e30 blows the images up: the engine's NaN guard raises at iteration 1.
    spec = load_spec(write_spec(tmp_path / "fail.yaml", "fail", {"lr_img": [0.1, 1e30]},
                                retries=1, checkpoint_every=2))
    outcome = service.launch(spec, progress=False)

    assert outcome.status == "FAILED"  # a sweep with a failed trial is not FINISHED
    assert outcome.finished == ["lr_img=0.1"]
    assert list(outcome.failed) == ["lr_img=1e+30"]
    assert "NonFiniteLossError" in outcome.failed["lr_img=1e+30"]
    assert "\n" not in outcome.failed["lr_img=1e+30"]  # one line, pointing at the traceback
    assert "(traceback: error.txt of run " in outcome.failed["lr_img=1e+30"]

    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "fail")
    assert parent.info.status == "FAILED"
    assert "1 of 2 trials failed" in parent.data.tags[tracking.TAG_FAILURE]
    assert parent.data.tags[tracking.TAG_FAILED] == "1"
    assert parent.data.tags[tracking.TAG_FINISHED] == "1"
    by_key = {r.data.tags[tracking.TAG_KEY]: r for r in children}
    assert len(children) == 2 and set(by_key) == {"lr_img=0.1", "lr_img=1e+30"}
    bad = by_key["lr_img=1e+30"]
    assert bad.info.status == "FAILED"
    assert "NonFiniteLossError" in bad.data.tags[tracking.TAG_FAILURE]
    error = Path(client.download_artifacts(bad.info.run_id, "error.txt", str(tmp_path)))
    assert "Traceback" in error.read_text() and "NonFiniteLossError" in error.read_text()
    assert bad.data.tags[tracking.TAG_ATTEMPT] == "1"  # divergence recurs: never retried
    assert by_key["lr_img=0.1"].info.status == "FINISHED"
    assert tracking.TAG_FAILURE not in by_key["lr_img=0.1"].data.tags


def test_running_out_of_gpu_memory_fails_a_trial_at_once_saying_what_to_lower():
    """The same trial would ask for the same memory again: not retried, and the one line names
    how much was asked and which settings to lower."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                                 "total capacity of 79.1 GiB\nof which 1.2 GiB is free.")
    assert isinstance(oom, trainable.DETERMINISTIC_ERRORS)
    reason = trainable.failure_reason(oom)
    assert reason.startswith("out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "batch_real" in reason and "resources.gpu" in reason and "\n" not in reason
    assert trainable.failure_reason(ValueError("bad lr")) == "ValueError: bad lr"


def test_invalid_spec_fails_fast(tmp_path):
    home = tmp_path / "home"
    path = write_spec(tmp_path / "bad.yaml", "bad", {"lamda": [0.1], "ipc": [0]})
    env = cli_env(home)
    result = subprocess.run(cli("launch", str(path)), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "grid.lamda: unknown engine field 'lamda'; did you mean 'lam'?" in result.stderr
    assert "grid.ipc[0]" in result.stderr
    assert result.stdout == ""
    assert not home.exists()  # no MLflow store, no Ray results

    # in the same process: Ray and MLflow are not even imported
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['mim4dd-sweep', 'launch', {str(path)!r}]\n"
        "try:\n    runpy.run_module('orchestrator.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'ray' in sys.modules, 'mlflow' in sys.modules)\n"
    )
    probed = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert probed.stdout.split() == ["2", "False", "False"], probed.stderr


def test_dry_run_lists_trials_and_starts_nothing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    path = write_spec(tmp_path / "dry.yaml", "dry", {"lam": [0, 0.8], "seed": [0, 1, 2]})
    result = CliRunner().invoke(app, ["launch", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 trials (dry run)" in result.output and "lam=0.8,seed=2" in result.output
    assert not home.exists()


def test_unknown_sweep_and_store_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.HOME_ENV, str(tmp_path / "nothing"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in (["status", "nope"], ["report", "nope"],
                    ["pull", "nope", "--lam", "0.8", "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1 and "no sweep named 'nope'" in result.output, command
    assert not (tmp_path / "nothing").exists()  # looking never creates a store


def test_trials_logging_the_same_dataset_at_one_instant_on_the_embedded_store(home, digits):
    experiment = log_one_dataset_at_once(tracking.connect(tracking.resolve_tracking_uri()),
                                         digits)
    with sqlite3.connect(home / "mlflow.db") as db:
        rows = db.execute("SELECT count(*) FROM datasets WHERE experiment_id = ? "
                          "GROUP BY name, digest", (int(experiment),)).fetchall()
    db.close()
    assert [count for (count,) in rows] == [1, 1, 1]  # one row per split, shared by all


def test_a_corrupted_store_is_one_line_for_every_command(tmp_path, monkeypatch):
    # Before: 297 lines of SQLAlchemy traceback from status, report, list and launch alike.
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_bytes(bytes(range(256)) * 64)  # not a database
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = write_spec(tmp_path / "c.yaml", "c", {"lam": [0]})
    for command in (["status", "c"], ["report", "c"], ["list"], ["launch", str(spec)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, (command, result.output)
        [line] = result.output.strip().splitlines()
        assert f"{home / 'mlflow.db'} is not an MLflow store sqlite can read" in line, line
        assert "move it aside" in line


def test_flatten_and_parse_round_trip():
    flat = trial_run.flatten({"lam": 0.8, "dataset": "digits", "mim_blocks": None,
                             "eval": {"epochs": 5, "dsa": True}, "lr_milestones": [1, 2]})
    assert flat == {"lam": "0.8", "dataset": "digits", "mim_blocks": "null",
                    "eval.epochs": "5", "eval.dsa": "true", "lr_milestones": "[1, 2]"}
    assert {k: tracking.parse_value(v) for k, v in flat.items()} == {
        "lam": 0.8, "dataset": "digits", "mim_blocks": None, "eval.epochs": 5,
        "eval.dsa": True, "lr_milestones": [1, 2]}


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.HOME_ENV, str(tmp_path / "h"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    embedded = tracking.resolve_tracking_uri()
    assert embedded == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert tracking.artifact_root(embedded) == (tmp_path / "h" / "artifacts").as_uri()
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking.artifact_root("http://127.0.0.1:5000") is None  # the server's proxy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:1")
    assert tracking.resolve_tracking_uri() == "http://example:1"
    command = queries.ui_command(embedded, "127.0.0.1", 5001)
    assert command[1:] == ["-m", "mlflow", "ui", "--backend-store-uri", embedded, "--host",
                           "127.0.0.1", "--port", "5001", "--workers", "1",
                           "--default-artifact-root", tracking.artifact_root(embedded)]



@pytest.mark.slow
def test_report_and_status_show_only_the_current_config(ray_cluster, home, tmp_path):
    path = write_spec(tmp_path / "changed.yaml", "changed", {"lam": [0]}, retries=0)
    first = service.launch(load_spec(path), progress=False)
    assert first.finished == ["lam=0"]
    assert CliRunner().invoke(app, ["report", "changed"]).exit_code == 0

    # The same trial key, now with a config that fails at its first step (lr_img 1e30).
    write_spec(path, "changed", {"lam": [0]}, retries=0, base={"lr_img": 1e30})
    second = service.launch(load_spec(path), progress=False)
    assert list(second.failed) == ["lam=0"] and not second.finished
    assert second.changed == ["lam=0"]  # said, not silent: the old run is kept, unreported
    assert "1 run again with changed settings" in second.counts()

    # The old config's finished run is still in MLflow, but no view counts it any more.
    assert len(sweep_runs(tracking.resolve_tracking_uri(), "changed")[2]) == 2
    report = CliRunner().invoke(app, ["report", "changed"])
    assert report.exit_code == 1 and "no finished trials yet" in report.output, report.output
    assert "1 trial(s) also have finished results of an older config" in report.output
    status = queries.sweep_status("changed")
    assert [(t["key"], t["status"]) for t in status.trials] == [("lam=0", "FAILED")]
    assert "FINISHED" not in CliRunner().invoke(app, ["status", "changed"]).output


@pytest.mark.slow
def test_trials_that_never_get_resources_end_the_sweep(ray_cluster, home, tmp_path):
    from orchestrator.tune_run import PendingTimeoutError

    @ray.remote(num_cpus=2)
    class Hog:  # another job holding every CPU of the cluster, for good
        def ping(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        spec = load_spec(write_spec(tmp_path / "starved.yaml", "starved", {"lam": [0]},
                                    pending_timeout_s=3))
        with pytest.raises(PendingTimeoutError, match="waited over 3 s for resources"):
            service.launch(spec, progress=False)
    finally:
        ray.kill(hog)
    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "starved")
    assert parent.info.status == "FAILED" and not children
    assert "pending_timeout_s" in parent.data.tags[tracking.TAG_FAILURE]


def test_a_trial_run_samples_system_metrics_and_leaves_no_thread(home, monkeypatch):
    import threading

    from mim4dd.config import Config
    from orchestrator.expand import Trial

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = tracking.resolve_tracking_uri()
    client = tracking.connect(uri)
    experiment = tracking.ensure_experiment(client, "sysmetrics", uri)
    parent = tracking.open_sweep_run(client, experiment, "sys", {}, {"grid.seed": "[0]"})
    trial = Trial("seed=0", {"seed": 0}, Config(dataset="digits", iterations=3))
    run = trial_run.TrialRun.open(client, parent.info.run_id, "sys", trial,
                                  tags=lineage.source_tags())
    run.log_iteration(1, {"loss": 1.0})
    wait_for(lambda: any(k.startswith("system/") for k in
                         client.get_run(run.run_id).data.metrics), 30, "system metrics")
    run.finish()
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in finished.data.metrics
    assert finished.data.tags[tracking.TAG_ITERATION] == "1"

    # A relaunch whose grid changed: MLflow keeps a param forever, so the parent says which.
    again = tracking.open_sweep_run(client, experiment, "sys", {}, {"grid.seed": "[0, 1]",
                                                                   "grid.lam": "[0]"})
    assert again.data.params == {"grid.seed": "[0]", "grid.lam": "[0]"}
    assert again.data.tags[tracking.TAG_STALE_PARAMS] == "grid.seed"


def test_a_reopened_run_skips_steps_it_holds_even_when_its_tag_lags(home):
    # The store writes a batch's metrics, then its tags: a kill in between leaves the
    # iteration tag behind the metrics. A resumed trial must still not log those steps again.
    from mim4dd.config import Config
    from orchestrator.expand import Trial

    uri = tracking.resolve_tracking_uri()
    client = tracking.connect(uri)
    experiment = tracking.ensure_experiment(client, "lag", uri)
    parent = tracking.open_sweep_run(client, experiment, "lag", {}, {"grid.seed": "[0]"})
    trial = Trial("seed=0", {"seed": 0}, Config(dataset="digits", iterations=8))
    run = trial_run.TrialRun.open(client, parent.info.run_id, "lag", trial)
    for step in range(1, 4):
        run.log_iteration(step, {"loss": float(step)})
    run.flush()  # steps 1-3 and the tag 3
    client.log_batch(run.run_id, metrics=[Metric("loss", 4.0, 0, 4), Metric("loss", 5.0, 0, 5)])
    run.stop("killed")  # steps 4-5 written, the tag still says 3

    again = trial_run.TrialRun.open(client, parent.info.run_id, "lag", trial, run_id=run.run_id)
    for step in range(1, 7):
        again.log_iteration(step, {"loss": float(step)})
    again.finish()
    steps = [m.step for m in client.get_metric_history(run.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def test_the_mlflow_preview_lays_a_tall_grid_out_about_square(tmp_path):
    from PIL import Image

    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    SyntheticSet.create(  # 10 classes x IPC 1: grid.png is one column of 10 images
        images, torch.arange(10), dataset="digits", class_names=[str(c) for c in range(10)],
        mean=(0.0,), std=(1.0,), config={}, eval_protocol={},
    ).save(tmp_path / "set")
    with Image.open(tmp_path / "set" / "grid.png") as grid:
        grid = grid.convert("RGB")
    preview = trial_run.squarer(grid, rows=10)
    assert grid.height > 5 * grid.width and 0.5 < preview.width / preview.height < 2
    step, pad = (grid.height - 2) // 10, 2
    width = grid.width - pad  # a row: its class name and image, and the padding left of them
    per_line = (preview.width - pad) // width
    for row in range(10):  # every class's row is in the preview, unchanged
        line, slot = divmod(row, per_line)
        x, y = slot * width, line * step
        assert preview.crop((x, y, x + width, y + step)).tobytes() == grid.crop(
            (0, row * step, width, row * step + step)).tobytes()
    wide = grid.resize((grid.height, grid.width))  # already wider than tall: left as it is
    assert trial_run.squarer(wide, rows=1) is wide
