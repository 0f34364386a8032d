"""Cross-architecture evaluation in the sweep service: per-architecture metrics in MLflow and
the report, and an evaluation that is checkpointed network by network.

Real Ray Tune, a real MLflow store, scikit-learn's 8x8 digits evaluated on the two pool
networks cheap enough for them (convnet and mlp).
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
from processes import HAS_PROC, kill_session  # noqa: E402
from sweep_helpers import ROOT, TINY, cli, cli_env, sweep_runs, wait_for, write_spec  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mim4dd.distill import read_state  # noqa: E402
from mim4dd.experiment import STATE_FILE  # noqa: E402
from mim4dd.metrics import EVAL_PREFIX, arch_metric, net_metric  # noqa: E402
from orchestrator import service, tracking  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.trainable import NETWORKS_FILE  # noqa: E402
from orchestrator.tune_folder import TRIAL_FILE  # noqa: E402

MODELS = ["convnet", "mlp"]


def arch_accuracies(run, arch: str, nets: int = 2) -> list[float]:
    return [run.data.metrics[arch_metric(arch, net_metric("test", i))] for i in range(nets)]


def tune_results(home, name: str) -> list[dict]:
    """Every result the sweep's trials reported to Tune, in order (each trial's result.json)."""
    lines = []
    for path in sorted((home / "ray_results" / name).glob("*/*/result.json")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def assert_eval_metrics_logged_once(client, run) -> None:
    for name in (k for k in run.data.metrics if k.startswith(EVAL_PREFIX)):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0], (name, history)


@pytest.mark.slow
def test_a_sweep_on_two_architectures_reports_a_column_each(ray_cluster, home, tmp_path):
    path = write_spec(tmp_path / "xarch.yaml", "xarch", {"lam": [0, 0.8], "seed": [0, 1]},
                      base={"eval": {**TINY["eval"], "models": MODELS}}, checkpoint_every=4)
    outcome = service.launch(load_spec(path), progress=False, source=path)
    assert outcome.status == "FINISHED" and len(outcome.finished) == 4

    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "xarch")
    for run in children:
        for arch in MODELS:  # every network of every architecture, by name
            assert len(arch_accuracies(run, arch)) == 2
        # The headline is models[0]'s, under the names a ConvNet-only sweep uses.
        assert [run.data.metrics[net_metric("test", i)] for i in range(2)] == arch_accuracies(
            run, "convnet")
        assert_eval_metrics_logged_once(client, run)
    # Tune heard of each network as it finished, with a checkpoint each.
    progress = [r["eval_networks_done"] for r in tune_results(home, "xarch")
                if "eval_networks_done" in r]
    assert sorted(progress) == sorted([1, 2, 3, 4] * 4)

    # The cross-architecture columns, by hand from the runs' metrics.
    expected = {}
    for lam in (0.0, 0.8):
        runs = [r for r in children if float(r.data.params["lam"]) == lam]
        expected[lam] = {}
        for arch in MODELS:
            per_seed = [np.mean(arch_accuracies(r, arch)) for r in runs]
            expected[lam][arch] = (len(per_seed), np.mean(per_seed), np.std(per_seed))
    as_json = CliRunner().invoke(app, ["report", "xarch", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert "\\/" not in as_json.output  # column names read as written: convnet/...
    rows = json.loads(as_json.output)
    assert sorted(r["lam"] for r in rows) == [0, 0.8]
    for row in rows:
        for arch in MODELS:
            found = (row[f"{arch}/n_seeds"], row[f"{arch}/seed_level_mean_pct"],
                     row[f"{arch}/seed_level_std_pct"])
            assert found == pytest.approx(expected[row["lam"]][arch])
        # The headline column is the main table's number.
        assert row["convnet/seed_level_mean_pct"] == pytest.approx(row["seed_level_mean_pct"])
    as_csv = CliRunner().invoke(app, ["report", "xarch", "--format", "csv"])
    table = pd.read_csv(io.StringIO(as_csv.output))
    assert {"mlp/seed_level_mean_pct", "mlp/diff_vs_lam0_mean_pct"} <= set(table.columns)
    shown = CliRunner().invoke(app, ["report", "xarch"])
    assert shown.exit_code == 0 and "per architecture" in shown.output, shown.output
    mean, std = expected[0.8]["mlp"][1:]
    assert f"{mean:.2f} ± {std:.2f}" in shown.output
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "aggregate")}
    assert {"aggregate/architectures.csv", "aggregate/architectures.md"} <= logged


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="finds processes in /proc")
def test_a_trial_killed_mid_evaluation_resumes_without_redoing_networks(ray_cluster, home,
                                                                         tmp_path):
    # 5 iterations with checkpoints every 2: the final state is saved when evaluation starts.
    # 2 architectures x 3 networks of 300 epochs: ConvNet's take ~3 s each (one thread), time
    # to kill in between.
    eval_config = {**TINY["eval"], "models": MODELS, "num_nets": 3, "epochs": 300}
    path = write_spec(tmp_path / "evalkill.yaml", "evalkill", {"lam": [0.8]},
                      base={"iterations": 5, "eval": eval_config}, checkpoint_every=2)
    env, command = cli_env(home), cli("launch", str(path))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    folder = home / "ray_results" / "evalkill"

    def networks_checkpointed(checkpoint: Path) -> int:
        """Networks a whole checkpoint holds (every file of it reads); 0 for none."""
        try:
            read_state(checkpoint / STATE_FILE)
            json.loads((checkpoint / TRIAL_FILE).read_text())
            return len(json.loads((checkpoint / NETWORKS_FILE).read_text()))
        except Exception:  # not (yet) whole: missing, cut short, still being copied
            return 0

    def some_networks_checkpointed() -> bool:
        saved = [networks_checkpointed(p) for p in folder.glob("*/*/checkpoint_*")]
        return 1 <= max(saved, default=0) <= 3

    try:  # killed once a whole checkpoint holds 1-3 of the 6 networks
        wait_for(some_networks_checkpointed, 240, "a checkpoint with finished networks", 0.05)
    finally:
        kill_session(first)
        log.close()
    _, _, [run] = sweep_runs(tracking.resolve_tracking_uri(), "evalkill")
    assert run.info.status == "RUNNING", (tmp_path / "first.log").read_text()

    second = service.launch(load_spec(path), progress=False)  # in this process: the relaunch
    assert second.finished == ["lam=0.8"] and not second.skipped and second.resumed == 1

    client, _, [run] = sweep_runs(tracking.resolve_tracking_uri(), "evalkill")
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_ATTEMPT] == "2"
    assert run.data.tags[tracking.TAG_RESUMED] == "5"  # from the final state: no distilling
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    # The resumed attempt (the killed launch's folder is gone once it finished) trained only
    # the networks its checkpoint did not hold: its reports count on from there, each once.
    rows = tune_results(home, "evalkill")
    resumed = [r["eval_networks_done"] for r in rows if "eval_networks_done" in r]
    assert resumed and resumed == list(range(resumed[0], 7)) and resumed[0] >= 2, resumed
    assert not [r for r in rows if "loss" in r]
    assert_eval_metrics_logged_once(client, run)
    results = json.loads(Path(client.download_artifacts(
        run.info.run_id, "results.json", str(tmp_path))).read_text())
    for arch in MODELS:
        saved = results["evaluation"]["architectures"][arch]["test_accuracies"]
        assert arch_accuracies(run, arch, 3) == pytest.approx([100 * a for a in saved])


@pytest.mark.slow
def test_evaluate_adds_architectures_to_a_finished_sweep_once(ray_cluster, home, tmp_path):
    from orchestrator import reevaluate
    from orchestrator.reevaluate import evaluate_sweep

    path = write_spec(tmp_path / "plain.yaml", "plain", {"seed": [0, 1]})  # ConvNet only
    assert service.launch(load_spec(path), progress=False).status == "FINISHED"

    class Stop(Exception):
        pass

    said = []

    def stop_at_the_third_network(text: str) -> None:
        said.append(text)
        if sum(" network " in line for line in said) == 3:
            raise Stop  # as Ctrl-C would, after that network's metrics were logged

    # Stopped after the third network, as Ctrl-C would after its metrics were logged: here in
    # this process, through what each Ray task of `evaluate_sweep` runs for its trial.
    client, _, children = sweep_runs(tracking.resolve_tracking_uri(), "plain")
    by_key = {r.data.tags[tracking.TAG_KEY]: r for r in children}
    with pytest.raises(Stop):
        for key in sorted(by_key):
            reevaluate._evaluate_run(client, by_key[key], ["convnet", "mlp"], None,
                                     stop_at_the_third_network)
    said.clear()
    rows = evaluate_sweep("plain", ["convnet", "mlp"], say=said.append)
    # Resumed: only the one network the stop left untrained was trained.
    assert [line.rsplit(": ", 1)[0] for line in said if " network " in line] == [
        "seed=1: mlp network 1"]
    assert [(r["trial"], r["added"], r["already there"], r["error"]) for r in rows] == [
        ("seed=0", "", "convnet, mlp", ""), ("seed=1", "mlp", "convnet", "")]

    _, _, children = sweep_runs(tracking.resolve_tracking_uri(), "plain")
    before = {r.info.run_id: dict(r.data.metrics) for r in children}
    again = CliRunner().invoke(app, ["evaluate", "plain", "--models", "mlp,convnet"])
    assert again.exit_code == 0, again.output
    client, _, children = sweep_runs(tracking.resolve_tracking_uri(), "plain")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for run in children:
        assert run.data.metrics == before[run.info.run_id]  # the repeat added nothing
        assert_eval_metrics_logged_once(client, run)
        # The trial's own ConvNet numbers, now also under its architecture's names; not retrained.
        assert arch_accuracies(run, "convnet") == [
            run.data.metrics[net_metric("test", i)] for i in range(2)]
        mlp = arch_accuracies(run, "mlp")
        assert run.data.metrics[arch_metric("mlp", "eval/test_acc_mean_pct")] == pytest.approx(
            np.mean(mlp))
    [row] = json.loads(CliRunner().invoke(app, ["report", "plain", "--format", "json"]).output)
    assert row["convnet/seed_level_mean_pct"] == pytest.approx(row["seed_level_mean_pct"])
    assert row["mlp/n_seeds"] == 2

    refused = CliRunner().invoke(app, ["evaluate", "plain", "--models", "vgg11"])
    assert refused.exit_code == 1 and "vgg11: cannot take 1x8x8 images" in refused.output
    unknown = CliRunner().invoke(app, ["evaluate", "plain", "--models", "resnet"])
    assert unknown.exit_code == 1 and "unknown architecture 'resnet'" in unknown.output
