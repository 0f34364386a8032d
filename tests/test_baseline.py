"""The random-real baseline: cached once per key on disk, reused, and reported per cell.

Real evaluations on scikit-learn's 8x8 digits; the sweep test runs real Ray Tune and MLflow.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_config

from mim4dd import baseline, experiment
from mim4dd.experiment import evaluate_random_baseline
from mim4dd.metrics import (
    NET_TEST_ACC,
    RANDOM_TEST_ACC_MEAN,
    TEST_ACC_MEAN,
    arch_metric,
    metric_architecture,
    net_metric,
    random_metric,
)


def _config(tmp_path, **overrides):
    # data_root: the cache goes to tmp_path/baselines, never to the user's ~/.cache.
    return tiny_config(**{"data_root": str(tmp_path), "eval": {"epochs": 2, "num_nets": 2},
                          **overrides})


def test_the_cache_is_computed_once_and_equals_the_direct_evaluation(tmp_path, digits,
                                                                      monkeypatch):
    calls = []
    evaluate = experiment.evaluate_random_baseline
    monkeypatch.setattr(experiment, "evaluate_random_baseline",
                        lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    config = _config(tmp_path)
    first = baseline.random_baseline(config, digits)
    path = baseline.baseline_path(config)
    assert path.parent == tmp_path / baseline.FOLDER and len(calls) == 1
    # A trial of another λ, base or budget: the same key, read from the file.
    again = baseline.random_baseline(config.model_copy(update={"lam": 0.0, "iterations": 9}))
    assert len(calls) == 1 and again.to_dict() == first.to_dict()
    assert first.to_dict() == evaluate_random_baseline(config, digits).to_dict()
    assert json.loads(path.read_text())["key"] == baseline.baseline_key(config)  # JSON, readable
    # A corrupt file is recomputed and rewritten, not trusted.
    path.write_text("{not json")
    assert baseline.random_baseline(config, digits).to_dict() == first.to_dict()
    assert len(calls) == 2 and json.loads(path.read_text())


def test_the_key_changes_with_what_the_numbers_depend_on(tmp_path):
    config = _config(tmp_path)
    paths = {baseline.baseline_path(c) for c in [
        config,
        config.model_copy(update={"seed": 1}),
        config.model_copy(update={"ipc": 3}),
        config.model_copy(update={"zca": True}),
        config.model_copy(update={"split_seed": 1}),
        config.model_copy(update={"eval": config.eval.model_copy(update={"epochs": 3})}),
        config.model_copy(update={"eval": config.eval.model_copy(update={"models": ["mlp"]})}),
        config.model_copy(update={"model": config.model.model_copy(update={"width": 16})}),
    ]}
    assert len(paths) == 8
    # What only the distillation reads shares it.
    same = config.model_copy(update={"lam": 0.0, "base": "dc", "iterations": 50, "lr_img": 1.0})
    assert baseline.baseline_path(same) == baseline.baseline_path(config)


def test_random_metrics_are_named_apart_from_the_sets(tmp_path, digits):
    config = _config(tmp_path, eval={"epochs": 1, "num_nets": 1, "models": ["convnet", "mlp"]})
    metrics = baseline.random_metrics(baseline.random_baseline(config, digits))
    assert RANDOM_TEST_ACC_MEAN == random_metric(TEST_ACC_MEAN) and RANDOM_TEST_ACC_MEAN in metrics
    assert arch_metric("mlp", random_metric(net_metric("test", 0))) in metrics
    for name in metrics:  # never read as a set's accuracy, nor as an architecture "random"
        arch, rest = metric_architecture(name)
        assert arch in (None, "convnet", "mlp") and not NET_TEST_ACC.match(rest)


@pytest.mark.slow
def test_a_sweep_reports_the_improvement_over_random(ray_cluster, home, tmp_path):
    pytest.importorskip("ray")
    from sweep_helpers import TINY, sweep_runs, write_spec
    from typer.testing import CliRunner

    from orchestrator import service, tracking
    from orchestrator.cli import app
    from orchestrator.spec import load_spec

    evaluation = {**TINY["eval"], "models": ["convnet", "mlp"]}
    path = write_spec(tmp_path / "rnd.yaml", "rnd", {"lam": [0, 0.8], "seed": [0, 1]},
                      base={"data_root": str(tmp_path / "data"), "eval": evaluation},
                      random_baseline=True)
    outcome = service.launch(load_spec(path), progress=False, source=path)
    assert outcome.status == "FINISHED" and len(outcome.finished) == 4

    client, parent, children = sweep_runs(tracking.resolve_tracking_uri(), "rnd")
    by_seed: dict[int, set] = {}
    for run in children:
        seed, metrics = int(run.data.params["seed"]), run.data.metrics
        random = {k: v for k, v in metrics.items() if "/random_" in k}
        assert random_metric(net_metric("test", 1)) in random
        assert random_metric(arch_metric("mlp", net_metric("test", 1))) in random
        by_seed.setdefault(seed, set()).add(json.dumps(random, sort_keys=True))
    # One baseline per seed, the same in both λ's trials, computed once each.
    assert {s: len(v) for s, v in by_seed.items()} == {0: 1, 1: 1}
    assert len(list((tmp_path / "data" / baseline.FOLDER).glob("*.json"))) == 2

    rows = json.loads(CliRunner().invoke(app, ["report", "rnd", "--format", "json"]).output)
    for row in rows:
        accuracy = {}
        for run in children:
            if float(run.data.params["lam"]) == row["lam"]:
                m = run.data.metrics
                accuracy[int(run.data.params["seed"])] = (m[TEST_ACC_MEAN],
                                                          m[RANDOM_TEST_ACC_MEAN])
        diffs = [a - r for a, r in accuracy.values()]
        assert row["diff_vs_random_mean_pct"] == pytest.approx(sum(diffs) / 2)
        assert row["random_mean_pct"] == pytest.approx(
            sum(r for _, r in accuracy.values()) / 2)
        # The per-architecture table: each architecture against its own baseline.
        assert row["convnet/diff_vs_random_mean_pct"] == pytest.approx(
            row["diff_vs_random_mean_pct"])
        assert not math.isnan(row["mlp/diff_vs_random_mean_pct"])
    shown = CliRunner().invoke(app, ["report", "rnd"])
    assert shown.exit_code == 0 and "vs random" in shown.output, shown.output
    logged = client.get_run(parent.info.run_id).data.metrics
    assert any(k.endswith("/diff_vs_random_mean_pct") for k in logged)
