"""Sweep results: per-cell mean ± std tables and accuracy plots from the trials' child runs.

A *cell* is a grid point with the `seed` axis removed. Two summaries per cell, both with the
population std (ddof=0, as `EvalResult.std` and the DD literature report it):

* seed-level (the headline): each seed's mean test accuracy over its evaluation networks, then
  mean ± std of those per-seed means;
* pooled: mean ± std over every network of every seed together;

the validation accuracy, mean ± std over seeds, and which λ of each group of otherwise equal
cells the validation split picks (`CHOSEN`: the test split never chooses); and, for a cell whose
λ = 0 twin ran the same seeds, the paired difference from it with its 95 % confidence interval
(`orchestrator.paired`); in a sweep with `random_baseline`, the random-real baseline and the
paired improvement over it (`orchestrator.versus_random`). Accuracies are percentages throughout.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mim4dd.metrics import NET_TEST_ACC, VAL_ACC_MEAN, metric_architecture
from orchestrator import paired, versus_random

SEED = "seed"
_NET_COLUMN = re.compile(r"^test_acc_net(\d+)_pct$")  # the trial frame's per-network accuracy
CELL_METRIC = "cell/"  # parent-run metrics: cell/<cell>/<summary column>
VAL = "val_acc_mean_pct"  # the trial frame's validation accuracy (mean over its networks)
VAL_MEAN, VAL_STD = "val_mean_pct", "val_std_pct"  # over seeds
# 1 for the cell of the highest validation mean among cells differing only in λ, else 0
# (NaN without a λ axis or validation accuracies: nothing to choose)
CHOSEN = "chosen_on_val"

SUMMARY_COLUMNS = [
    "n_seeds", "n_nets",
    "seed_level_mean_pct", "seed_level_std_pct", "pooled_mean_pct", "pooled_std_pct",
    VAL_MEAN, VAL_STD, CHOSEN, *paired.COLUMNS, *versus_random.COLUMNS,
]


def _hashable(value: Any) -> Any:
    """Lists and mappings (e.g. lr_milestones) as their JSON text, so they can be grouped."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def trial_frame(runs: Iterable[Any]) -> tuple[pd.DataFrame, list[str]]:
    """One row per FINISHED trial run: key, swept settings, seed, per-network accuracies (%):
    the headline's as `test_acc_net<i>_pct`, and in a cross-architecture evaluation every
    architecture's as `<arch>/test_acc_net<i>_pct` (`orchestrator.cross_arch`); and the
    headline's validation accuracy (`VAL`, NaN without a validation split).

    Returns the frame and the swept axes (the dotted paths of the trials' grid points). When a
    trial key ran more than once (a changed config), only its newest finished run counts.
    """
    from orchestrator import tracking

    chosen = sorted(tracking.latest_per_key(runs).items())
    axes: list[str] = []
    for _, run in chosen:
        overrides = json.loads(run.data.tags.get(tracking.TAG_OVERRIDES, "{}"))
        axes += [a for a in overrides if a not in axes]
    rows = []
    for key, run in chosen:
        # The full config is logged as params, so an `include` trial that does not set an
        # axis still has its value.
        values = tracking.trial_values(run)
        row = {"trial_key": key, "run_id": run.info.run_id}
        row |= {axis: _hashable(values.get(axis)) for axis in [*axes, SEED]}
        row[VAL] = run.data.metrics.get(VAL_ACC_MEAN, math.nan)
        row[versus_random.FRAME_COLUMN] = versus_random.trial_value(run.data.metrics)
        for name, value in run.data.metrics.items():
            arch, headline = metric_architecture(name)
            if match := NET_TEST_ACC.match(headline):
                column = f"test_acc_net{match.group(1)}_pct"
                row[f"{arch}/{column}" if arch else column] = value
            elif arch and headline == versus_random.TRIAL_METRIC:  # for the per-arch table
                row[f"{arch}/{versus_random.FRAME_COLUMN}"] = value
        rows.append(row)
    return pd.DataFrame(rows), axes


def net_columns(frame: pd.DataFrame) -> list[str]:
    nets = {int(m.group(1)): c for c in frame.columns if (m := _NET_COLUMN.match(str(c)))}
    return [nets[i] for i in sorted(nets)]


def _groups(frame: pd.DataFrame, by: Sequence[str]) -> Iterable[tuple[tuple, pd.DataFrame]]:
    """(values, rows) per distinct combination of `by`; one group of everything without."""
    if not by:
        yield (), frame
        return
    for values, group in frame.groupby(list(by), sort=True, dropna=False):
        yield (values if isinstance(values, tuple) else (values,)), group


def summarize(frame: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Per cell (every axis but `seed`): seed count, seed-level and pooled mean ± std, and
    the paired difference from the cell's λ = 0 twin, all in %."""
    cells = [a for a in axes if a != SEED]
    nets = net_columns(frame)
    if frame.empty or not nets:
        return pd.DataFrame(columns=[*cells, *SUMMARY_COLUMNS])
    seed_mean = pd.Series([_nanmean(row) for row in frame[nets].to_numpy(dtype=float)],
                          index=frame.index)
    per_seed = {values: seed_mean[group.index].groupby(group[SEED]).mean().dropna()
                for values, group in _groups(frame, cells)}
    versus = paired.versus_baseline(per_seed, cells)
    rows = []
    for values, group in _groups(frame, cells):
        seeds = per_seed[values]
        pooled = pd.Series(group[nets].to_numpy(dtype=float).ravel()).dropna()
        val = group.groupby(SEED)[VAL].mean().dropna() if VAL in group else pd.Series()
        random = (group.groupby(SEED)[versus_random.FRAME_COLUMN].mean()
                  if versus_random.FRAME_COLUMN in group else pd.Series())
        rows.append({
            **dict(zip(cells, values, strict=True)),
            "n_seeds": len(seeds),
            "n_nets": len(pooled),
            "seed_level_mean_pct": seeds.mean(),
            "seed_level_std_pct": seeds.std(ddof=0),
            "pooled_mean_pct": pooled.mean(),
            "pooled_std_pct": pooled.std(ddof=0),
            VAL_MEAN: val.mean() if len(val) else math.nan,
            VAL_STD: val.std(ddof=0) if len(val) else math.nan,
            paired.N_PAIRS: 0,
            **versus.get(values, {}),
            **versus_random.versus_random(seeds, random),
        })
    summary = pd.DataFrame(rows, columns=[*cells, *SUMMARY_COLUMNS])
    summary[CHOSEN] = _chosen_on_validation(summary, cells)
    return summary


def _chosen_on_validation(summary: pd.DataFrame, cells: Sequence[str]) -> pd.Series:
    """1 where a cell has the highest validation mean among the cells that differ from it only
    in λ (the first on a tie), else 0; NaN without a λ axis or validation accuracies, and for
    a cell with no such sibling (a one-factor variant at one λ: there was nothing to pick)."""
    chosen = pd.Series(math.nan, index=summary.index)
    if paired.LAM not in cells or summary[VAL_MEAN].isna().all():
        return chosen
    for _, group in _groups(summary, [c for c in cells if c != paired.LAM]):
        if len(group) > 1 and group[VAL_MEAN].notna().any():
            chosen[group.index] = 0.0
            chosen[group[VAL_MEAN].idxmax()] = 1.0
    return chosen


def _nanmean(values: Any) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def cell_axes(summary: pd.DataFrame) -> list[str]:
    return [c for c in summary.columns if c not in SUMMARY_COLUMNS]


LEGEND = ("seed-level: mean ± std over seeds of each seed's mean over its networks (each seed "
          "trains networks of its own initialisation unless eval.net_seeds is shared, so this "
          "spread counts the randomness of distillation and of initialisation); pooled: over "
          "every network of every seed (population std). Δ: the paired difference from "
          "the same seeds at λ = 0, in percentage points, with its 95 % confidence interval "
          "(Student t over seeds). val: validation accuracy, mean ± std over seeds; 'λ picked "
          "on val': the cell whose validation mean is highest among those differing only in λ "
          "(the test split never chooses).")


def _baselined(summary: pd.DataFrame) -> bool:  # random real images were evaluated
    return bool(summary[versus_random.RANDOM_MEAN].notna().any())


def exported(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as files and csv/json give it: baseline columns only where there is one."""
    return summary if _baselined(summary) else summary.drop(columns=versus_random.COLUMNS)


def legend(summary: pd.DataFrame) -> str:
    """What the summary's table shows, its random-baseline columns only where it has them."""
    return LEGEND + (f" {versus_random.LEGEND}" if _baselined(summary) else "")


def number_text(value: Any) -> str:
    """A cell value as the tables show it (a float in %g: 0.8, 1e-05)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _difference(row: dict[str, Any]) -> str:
    if not row[paired.N_PAIRS]:
        return "baseline" if row.get(paired.LAM) == 0 else ""
    text = f"{row[paired.DIFF_MEAN]:+.2f}"
    if math.isnan(row[paired.DIFF_LOW]):
        return f"{text} (1 seed: no CI)"
    return f"{text} [{row[paired.DIFF_LOW]:+.2f}, {row[paired.DIFF_HIGH]:+.2f}]"


def display_rows(summary: pd.DataFrame) -> list[dict[str, str]]:
    """The summary for people, one dict of text per cell: the table of `report` and of
    summary.md."""
    axes = cell_axes(summary)
    validated = bool(summary[VAL_MEAN].notna().any())
    baselined = _baselined(summary)
    rows = []
    for row in summary.to_dict("records"):  # records keep ints as ints, unlike iterrows
        shown = {a: number_text(row[a]) for a in axes}
        shown["seeds"] = str(row["n_seeds"])
        for kind, what in (("seed_level", "seed-level"), ("pooled", "pooled")):
            mean, std = row[f"{kind}_mean_pct"], row[f"{kind}_std_pct"]
            shown[f"test acc % {what} (mean ± std)"] = f"{mean:.2f} ± {std:.2f}"
        shown["nets"] = str(row["n_nets"])
        if validated:
            shown["val % (mean ± std)"] = (
                "" if math.isnan(row[VAL_MEAN]) else f"{row[VAL_MEAN]:.2f} ± {row[VAL_STD]:.2f}")
        if baselined:
            shown |= versus_random.display(row)
        if paired.LAM in axes:
            shown["Δ vs λ = 0, pp [95 % CI]"] = _difference(row)
            if validated:
                shown["λ picked on val"] = "yes" if row[CHOSEN] == 1 else ""
        rows.append(shown)
    return rows


def to_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, accuracies as 'mean ± std', and what they mean."""
    rows = display_rows(summary)
    header = list(rows[0]) if rows else [*cell_axes(summary), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    return "\n".join([*lines, "", legend(summary)]) + "\n"


def cell_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """Every number of the summary as a parent-run metric, `cell/<axis>_<value>/.../<column>`
    (e.g. cell/lam_0.8/diff_vs_lam0_mean_pct); a missing number is left out."""
    axes = cell_axes(summary)
    metrics = {}
    for row in summary.to_dict("records"):
        cell = "/".join(f"{a}_{number_text(row[a])}" for a in axes) or "all"
        cell = re.sub(r"[^\w.\-/ ]", "_", cell)  # what MLflow allows in a metric name
        for column in SUMMARY_COLUMNS:
            if not pd.isna(row[column]):
                # Far below any resolution: the UI shows 0.123, not 0.12300000000000466.
                metrics[f"{CELL_METRIC}{cell}/{column}"] = round(float(row[column]), 9)
    return metrics


def _numeric(values: pd.Series) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_axes(summary: pd.DataFrame) -> list[str]:
    """Axes worth a plot: numeric, with at least two values."""
    return [a for a in cell_axes(summary)
            if _numeric(summary[a]) and summary[a].nunique() > 1]


def plot(summary: pd.DataFrame, axis: str, path: Path, title: str = "") -> Path:
    """Seed-level accuracy vs `axis` with std error bars, one line per other-axes combination;
    below it, when the sweep has λ = 0 twins, each cell's paired difference from its twin
    with its 95 % confidence interval."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    others = [a for a in cell_axes(summary) if a != axis]
    compared = bool(summary[paired.DIFF_MEAN].notna().any())
    figure = Figure(figsize=(6, 6.5 if compared else 4), layout="constrained")
    top, *bottom = figure.subplots(1 + compared, 1, sharex=True, squeeze=False)[:, 0]
    for values, group in _groups(summary, others):
        group = group.sort_values(axis)
        label = ", ".join(f"{a}={v}" for a, v in zip(others, values, strict=True)) or None
        line = top.errorbar(group[axis], group["seed_level_mean_pct"],
                            yerr=group["seed_level_std_pct"], marker="o", capsize=3, label=label)
        twinned = group.dropna(subset=[paired.DIFF_MEAN])
        if bottom and not twinned.empty:
            mean = twinned[paired.DIFF_MEAN]
            ci = [(mean - twinned[paired.DIFF_LOW]).fillna(0),
                  (twinned[paired.DIFF_HIGH] - mean).fillna(0)]  # one seed: no bar
            bottom[0].errorbar(twinned[axis], mean, yerr=ci, marker="o", capsize=3,
                               color=line.lines[0].get_color())
    top.set_ylabel("test accuracy % (mean ± std over seeds)")
    top.set_title(title or f"accuracy vs {axis}")
    if bottom:
        bottom[0].axhline(0, color="grey", linewidth=1, linestyle="--")
        bottom[0].set_ylabel("Δ vs same seeds at λ = 0, pp\n(paired, 95 % CI)")
    for ax in (top, *bottom):
        ax.grid(alpha=0.3)
    (bottom or [top])[0].set_xlabel(axis)
    if others:
        top.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def write_report(
    frame: pd.DataFrame, summary: pd.DataFrame, out_dir: Path, name: str = ""
) -> list[Path]:
    """trials.csv, summary.csv, summary.md and one accuracy_vs_<axis>.png per numeric axis."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "trials.csv", out_dir / "summary.csv", out_dir / "summary.md"]
    frame.to_csv(files[0], index=False)
    exported(summary).to_csv(files[1], index=False)
    title = f"# {name}\n\n" if name else ""
    files[2].write_text(title + to_markdown(summary))
    for axis in plot_axes(summary):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", axis)
        files.append(plot(summary, axis, out_dir / f"accuracy_vs_{safe}.png", title=name))
    return files


def log_report(
    client: Any, run_id: str, summary: pd.DataFrame, files: Sequence[Path], step: int,
) -> None:
    """On the parent run: the table (browsable in the MLflow UI), each cell's numbers as
    metrics at `step` (the launch's number: one value per launch, `cell_metrics`) and the
    files, under `aggregate/`."""
    from mlflow.entities import Metric

    from orchestrator import tracking

    if not summary.empty:
        tracking.log_table(client, run_id, exported(summary), "aggregate/summary.json")
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in cell_metrics(summary).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes 1000 per request
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
    for path in files:
        client.log_artifact(run_id, str(path), "aggregate")


__all__ = [
    "LEGEND",
    "legend",
    "SUMMARY_COLUMNS",
    "cell_metrics",
    "display_rows",
    "log_report",
    "number_text",
    "plot",
    "summarize",
    "to_markdown",
    "trial_frame",
    "write_report",
]
