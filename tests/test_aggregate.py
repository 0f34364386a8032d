"""Sweep aggregation on hand-computed inputs (no Ray, no MLflow store)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("mlflow")
from orchestrator import aggregate, paired, tracking, versus_random  # noqa: E402

# lam=0:   seed 0 nets (.5, .7) -> .6;  seed 1 (.8, .8) -> .8
# lam=0.8: seed 0 (.9, .9) -> .9;  seed 1 (.6, .8) -> .7;  seed 2 (.8, 1.0) -> .9
ACCURACIES = {
    (0.0, 0): [0.5, 0.7], (0.0, 1): [0.8, 0.8],
    (0.8, 0): [0.9, 0.9], (0.8, 1): [0.6, 0.8], (0.8, 2): [0.8, 1.0],
}


def frame(accuracies=ACCURACIES) -> pd.DataFrame:
    rows = []
    for (lam, seed), nets in accuracies.items():
        row = {"trial_key": f"lam={lam:g},seed={seed}", "lam": lam, "seed": seed}
        row |= {f"test_acc_net{i}_pct": 100 * a for i, a in enumerate(nets)}
        rows.append(row)
    return pd.DataFrame(rows)


def test_seed_level_and_pooled_by_hand():
    summary = aggregate.summarize(frame(), ["lam", "seed"])
    assert list(summary.columns) == ["lam", *aggregate.SUMMARY_COLUMNS]
    rows = summary.to_dict("records")
    # lam=0: per-seed means .6, .8 -> 70 ± 10; pooled .5 .7 .8 .8 -> 70 ± sqrt(.015)
    # It is the baseline: no difference.
    assert rows[0] == pytest.approx({
        "lam": 0.0, "n_seeds": 2, "n_nets": 4,
        "seed_level_mean_pct": 70.0, "seed_level_std_pct": 10.0,
        "pooled_mean_pct": 70.0, "pooled_std_pct": 100 * math.sqrt(0.015), "n_pairs": 0,
        "val_mean_pct": math.nan, "val_std_pct": math.nan, "chosen_on_val": math.nan,
        **dict.fromkeys(paired.COLUMNS[1:], math.nan),
        **dict.fromkeys(versus_random.COLUMNS, math.nan),
    }, nan_ok=True)
    # lam=0.8: per-seed .9 .7 .9 -> 83.33 ± 100*sqrt(.02667/3);
    # pooled .9 .9 .6 .8 .8 1.0 -> 83.33 ± 100*sqrt(.09333/6).
    # Paired with lam=0 on seeds 0 and 1 (seed 2 has no twin): d = 90-60, 70-80 = 30, -10;
    # mean 10, sd 20*sqrt(2), 95 % CI 10 ± t(.975, 1) * 20 = 10 ± 12.706 * 20.
    assert rows[1] == pytest.approx({
        "lam": 0.8, "n_seeds": 3, "n_nets": 6,
        "seed_level_mean_pct": 250 / 3, "seed_level_std_pct": 100 * math.sqrt(0.08 / 9),
        "pooled_mean_pct": 250 / 3, "pooled_std_pct": 100 * math.sqrt(0.28 / 18),
        "val_mean_pct": math.nan, "val_std_pct": math.nan, "chosen_on_val": math.nan,
        "n_pairs": 2, "diff_vs_lam0_mean_pct": 10.0,
        "diff_vs_lam0_ci95_low_pct": 10 - 12.7062047 * 20,
        "diff_vs_lam0_ci95_high_pct": 10 + 12.7062047 * 20,
        **dict.fromkeys(versus_random.COLUMNS, math.nan),
    }, nan_ok=True)


def test_the_validation_split_picks_lambda_per_group_and_the_test_split_never_does():
    # (dataset, lam): per-seed validation accuracies; test accuracies run the other way, so a
    # choice made on the test split would differ
    val = {("digits", 0.0): [50, 52], ("digits", 0.8): [56, 58], ("digits", 1.6): [54, 54],
           ("MNIST", 0.0): [90, 92], ("MNIST", 0.8): [88, 89], ("SVHN", 0.8): [80, 80]}
    rows = [{"dataset": d, "lam": lam, "seed": seed, "val_acc_mean_pct": v,
             "test_acc_net0_pct": 100 - v}
            for (d, lam), seeds in val.items() for seed, v in enumerate(seeds)]
    summary = aggregate.summarize(pd.DataFrame(rows), ["dataset", "lam", "seed"])
    found = {(r["dataset"], r["lam"]): r for r in summary.to_dict("records")}
    assert found["digits", 0.8]["val_mean_pct"] == 57.0
    assert found["digits", 0.8]["val_std_pct"] == 1.0
    assert found["digits", 1.6]["val_std_pct"] == 0.0
    chosen = {cell for cell, row in found.items() if row["chosen_on_val"] == 1}
    assert chosen == {("digits", 0.8), ("MNIST", 0.0)}  # one per dataset; lam 0 may win
    assert found["digits", 1.6]["chosen_on_val"] == 0
    assert math.isnan(found["SVHN", 0.8]["chosen_on_val"])  # a lone lambda: nothing to pick
    shown = {(r["dataset"], r["lam"]): r for r in aggregate.display_rows(summary)}
    assert shown["digits", "0.8"]["λ picked on val"] == "yes"
    assert shown["digits", "0"]["λ picked on val"] == shown["SVHN", "0.8"]["λ picked on val"] == ""
    assert shown["MNIST", "0.8"]["val % (mean ± std)"] == "88.50 ± 0.50"


def test_improvement_over_random_is_paired_by_seed():
    # Baselines (%): seed 0 -> 50, seed 1 -> 60; lam=0.8's seed 2 has none.
    data = frame()
    data[versus_random.FRAME_COLUMN] = [50.0 if s == 0 else 60.0 if s == 1 else math.nan
                                        for s in data["seed"]]
    rows = aggregate.summarize(data, ["lam", "seed"]).to_dict("records")
    # lam=0: per seed 60, 80 -> d = 10, 20; lam=0.8: 90, 70 (seed 2 unpaired) -> d = 40, 10.
    assert {k: rows[0][k] for k in versus_random.COLUMNS} == pytest.approx(
        {"random_mean_pct": 55.0, "random_std_pct": 5.0,
         "diff_vs_random_mean_pct": 15.0, "diff_vs_random_std_pct": 5.0})
    assert rows[1]["diff_vs_random_mean_pct"] == pytest.approx(25.0)
    assert rows[1]["diff_vs_random_std_pct"] == pytest.approx(15.0)
    shown = aggregate.display_rows(aggregate.summarize(data, ["lam", "seed"]))
    assert shown[0]["random % (mean ± std)"] == "55.00 ± 5.00"
    assert shown[1]["Δ vs random, pp (mean ± std)"] == "+25.00 ± 15.00"
    metrics = aggregate.cell_metrics(aggregate.summarize(data, ["lam", "seed"]))
    assert metrics["cell/lam_0.8/diff_vs_random_mean_pct"] == pytest.approx(25.0)
    # Without baselines the report has no such columns.
    assert "random % (mean ± std)" not in aggregate.display_rows(
        aggregate.summarize(frame(), ["lam", "seed"]))[0]


def test_two_axes_a_missing_network_and_no_axis():
    rows = [
        {"dataset": "digits", "lam": 0.8, "seed": 0, "test_acc_net0_pct": 40,
         "test_acc_net1_pct": 60},
        {"dataset": "digits", "lam": 0.8, "seed": 1, "test_acc_net0_pct": 20,
         "test_acc_net1_pct": float("nan")},
        {"dataset": "MNIST", "lam": 0.8, "seed": 0, "test_acc_net0_pct": 90,
         "test_acc_net1_pct": 90},
    ]
    summary = aggregate.summarize(pd.DataFrame(rows), ["dataset", "lam", "seed"])
    by_dataset = {r["dataset"]: r for r in summary.to_dict("records")}
    digits = by_dataset["digits"]
    # seed 0 -> .5, seed 1 -> .2 (its one network) -> 35 ± 15; pooled .4 .6 .2 -> 40 ± 16.33
    assert (digits["n_seeds"], digits["n_nets"]) == (2, 3)
    assert digits["seed_level_mean_pct"] == pytest.approx(35.0)
    assert digits["seed_level_std_pct"] == pytest.approx(15.0)
    assert digits["pooled_mean_pct"] == pytest.approx(40.0)
    assert digits["pooled_std_pct"] == pytest.approx(100 * math.sqrt(0.08 / 3))
    assert by_dataset["MNIST"]["seed_level_std_pct"] == 0.0
    assert digits["n_pairs"] == 0 and math.isnan(digits["diff_vs_lam0_mean_pct"])  # no twin

    # a sweep over seeds only is one cell
    only = aggregate.summarize(frame({(0.8, 0): [0.5, 0.7], (0.8, 1): [0.8, 0.8]}), ["seed"])
    assert list(only.columns) == aggregate.SUMMARY_COLUMNS
    assert only.iloc[0]["seed_level_mean_pct"] == pytest.approx(70.0)


def fake_run(key, overrides, params, accuracies, start, status="FINISHED"):
    tags = {tracking.TAG_KEY: key, tracking.TAG_OVERRIDES: json.dumps(overrides)}
    metrics = {f"eval/test_acc_net{i}_pct": a for i, a in enumerate(accuracies)}
    metrics["eval/test_acc_mean_pct"] = sum(accuracies) / len(accuracies)
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"id-{key}-{start}", status=status, start_time=start),
        data=SimpleNamespace(tags=tags, params=params, metrics=metrics),
    )


def test_trial_frame_from_runs():
    runs = [
        fake_run("lam=0,seed=0", {"lam": 0.0, "seed": 0}, {"lam": "0.0", "seed": "0"},
                 [0.1, 0.2], start=1),
        # the same trial ran again with a changed config: the newest finished run counts
        fake_run("lam=0,seed=0", {"lam": 0.0, "seed": 0}, {"lam": "0.0", "seed": "0"},
                 [0.5, 0.7], start=2),
        fake_run("lam=0.8,seed=0", {"lam": 0.8, "seed": 0}, {"lam": "0.8", "seed": "0"},
                 [0.9, 0.9], start=1),
        fake_run("lam=0.8,seed=1", {"lam": 0.8, "seed": 1}, {}, [0.0, 0.0], 1, "FAILED"),
        # an `include` trial that sets only the seed: its lam comes from its logged config
        fake_run("seed=7", {"seed": 7}, {"lam": "0.8", "seed": "7"}, [0.6, 0.8], start=1),
        fake_run("x", {"lr_milestones": [1, 2]}, {"lam": "0.8", "seed": "0"}, [0.5], start=1),
    ]
    table, axes = aggregate.trial_frame(runs)
    assert axes == ["lam", "seed", "lr_milestones"]
    rows = {r["trial_key"]: r for r in table.to_dict("records")}
    assert set(rows) == {"lam=0,seed=0", "lam=0.8,seed=0", "seed=7", "x"}
    assert rows["lam=0,seed=0"]["test_acc_net1_pct"] == 0.7
    assert rows["seed=7"]["lam"] == 0.8 and rows["seed=7"]["seed"] == 7
    assert rows["x"]["lr_milestones"] == "[1, 2]"  # lists become text, so cells can group
    assert math.isnan(rows["x"]["test_acc_net1_pct"])


def test_report_files(tmp_path):
    two_axes = frame()
    two_axes["dataset"] = ["digits", "MNIST", "digits", "MNIST", "digits"]
    summary = aggregate.summarize(two_axes, ["dataset", "lam", "seed"])
    files = aggregate.write_report(two_axes, summary, tmp_path, "demo")
    names = sorted(p.name for p in files)
    # a plot for the numeric axis, none for the dataset names
    assert names == ["accuracy_vs_lam.png", "summary.csv", "summary.md", "trials.csv"]
    # every column of the summary but the random baseline's, which this sweep did not ask for
    assert pd.read_csv(tmp_path / "summary.csv").shape == (len(summary), 19 - 4)
    markdown = (tmp_path / "summary.md").read_text().splitlines()
    assert markdown[0] == "# demo"
    assert markdown[2].startswith("| dataset | lam | seeds | test acc % seed-level")
    # digits, lam 0.8: seeds 0 and 2, both .9; pooled .9 .9 .8 1.0 -> 90 ± sqrt(.005); its
    # lam-0 twin ran seeds 0 (.6) and 1, so one pair: +30, no interval
    assert ("| digits | 0.8 | 2 | 90.00 ± 0.00 | 90.00 ± 7.07 | 4 | +30.00 (1 seed: no CI) |"
            in markdown)
    assert "| digits | 0 | 1 | 60.00 ± 0.00 | 60.00 ± 10.00 | 2 | baseline |" in markdown
    assert markdown[-1] == aggregate.LEGEND
    with Image.open(tmp_path / "accuracy_vs_lam.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_student_t_without_scipy_and_the_parent_metrics():
    # The fallback table is Student's t; between its rows it errs wide (a smaller df).
    from scipy.stats import t

    for df in (1, 2, 4, 9, 30, 120):
        assert paired._T975[df] == pytest.approx(t.ppf(0.975, df), abs=1e-3)
    assert paired.t975(5) == pytest.approx(2.5706, abs=1e-4)

    summary = aggregate.summarize(frame(), ["lam", "seed"])
    metrics = aggregate.cell_metrics(summary)
    assert metrics["cell/lam_0/seed_level_mean_pct"] == pytest.approx(70.0)
    assert metrics["cell/lam_0.8/diff_vs_lam0_mean_pct"] == pytest.approx(10.0)
    assert metrics["cell/lam_0.8/n_pairs"] == 2
    assert "cell/lam_0/diff_vs_lam0_mean_pct" not in metrics  # the baseline has none
    assert len(metrics) == 10 + 7  # every number of both cells, none missing


def test_parent_metrics_show_no_float_noise():
    """A difference of 70.123 - 70.0 is 0.12300000000000466 in floating point; the parent run's
    metric (what the MLflow UI shows) is 0.123."""
    noisy = frame({(0.0, 0): [0.70], (0.8, 0): [0.70123]})
    summary = aggregate.summarize(noisy, ["lam", "seed"])
    assert summary["diff_vs_lam0_mean_pct"].iloc[1] != 0.123  # the noise is real
    assert aggregate.cell_metrics(summary)["cell/lam_0.8/diff_vs_lam0_mean_pct"] == 0.123


def test_cross_architecture_table_by_hand(tmp_path):
    from orchestrator import cross_arch

    table = frame()  # the headline (ConvNet) networks of ACCURACIES
    for (lam, seed), nets in ACCURACIES.items():
        row = (table["lam"] == lam) & (table["seed"] == seed)
        for i, acc in enumerate(nets):
            table.loc[row, f"convnet/test_acc_net{i}_pct"] = 100 * acc
            # mlp: 10 points below convnet; seed 2 was not evaluated on it
            table.loc[row, f"mlp/test_acc_net{i}_pct"] = 100 * acc - 10 if seed < 2 else math.nan
    table = table[[*table.columns[::-1]]]  # the order of the columns does not matter
    assert cross_arch.architectures(table) == ["convnet", "mlp"]  # the pool's order
    summary = aggregate.summarize(table, ["lam", "seed"])
    archs = cross_arch.summarize(table, ["lam"])
    assert list(archs.columns) == ["lam", *(f"{a}/{c}" for a in ("convnet", "mlp")
                                             for c in cross_arch.COLUMNS)]
    rows = archs.to_dict("records")
    # convnet is the headline: the main table's numbers
    for row, main in zip(rows, summary.to_dict("records"), strict=True):
        for name in ("n_seeds", "seed_level_mean_pct", "seed_level_std_pct",
                     "diff_vs_lam0_mean_pct"):
            assert row[f"convnet/{name}"] == pytest.approx(main[name], nan_ok=True)
    # mlp, lam=0: seeds .5 and .7 -> 60 ± 10; lam=0.8: seeds .8 .6 (seed 2 not evaluated)
    assert [rows[0]["mlp/n_seeds"], rows[1]["mlp/n_seeds"]] == [2, 2]
    assert rows[0]["mlp/seed_level_mean_pct"] == pytest.approx(60.0)
    assert rows[0]["mlp/seed_level_std_pct"] == pytest.approx(10.0)
    assert rows[1]["mlp/seed_level_mean_pct"] == pytest.approx(70.0)
    assert rows[1]["mlp/diff_vs_lam0_mean_pct"] == pytest.approx(10.0)  # 80-50, 60-70

    shown = cross_arch.display_rows(archs)
    assert shown[0] == {"lam": "0", "convnet": "70.00 ± 10.00", "mlp": "60.00 ± 10.00"}
    assert shown[1]["mlp"] == "70.00 ± 10.00 (2 of 3 seeds)"
    merged = cross_arch.merged(summary, archs)
    assert list(merged.columns) == [*summary.columns, *archs.columns[1:]]
    assert merged["mlp/seed_level_mean_pct"].tolist() == pytest.approx([60.0, 70.0])
    files = cross_arch.write(archs, tmp_path, "demo")
    assert [p.name for p in files] == ["architectures.csv", "architectures.md"]
    assert "| lam | convnet | mlp |" in (tmp_path / "architectures.md").read_text()

    # without per-architecture metrics (a ConvNet-only sweep) there is no table
    assert cross_arch.summarize(frame(), ["lam"]).empty
    assert cross_arch.merged(summary, cross_arch.summarize(frame(), ["lam"])) is summary
