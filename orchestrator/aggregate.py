"""Sweep results: per-cell mean ± std tables and accuracy plots from the trials' child runs.

A *cell* is a grid point with the `seed` axis removed. Two summaries per cell, both with the
population std (ddof=0, as `EvalResult.std` and the DD literature report it):

* seed-level (the headline): each seed's mean test accuracy over its evaluation networks, then
  mean ± std of those per-seed means;
* pooled: mean ± std over every network of every seed together.

Accuracies in the tables are percentages.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

SEED = "seed"
NET_PREFIX = "test_acc_net"  # per-network accuracy columns of the trial frame, in [0, 1]
_METRIC = re.compile(r"^eval/test_acc_net(\d+)$")

SUMMARY_COLUMNS = [
    "n_seeds", "n_nets",
    "seed_level_mean_pct", "seed_level_std_pct", "pooled_mean_pct", "pooled_std_pct",
]


def _hashable(value: Any) -> Any:
    """Lists and mappings (e.g. lr_milestones) as their JSON text, so they can be grouped."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def trial_frame(runs: Iterable[Any]) -> tuple[pd.DataFrame, list[str]]:
    """One row per FINISHED trial run: key, swept settings, seed, per-network accuracies.

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
        for name, value in run.data.metrics.items():
            if match := _METRIC.match(name):
                row[f"{NET_PREFIX}{match.group(1)}"] = value
        rows.append(row)
    return pd.DataFrame(rows), axes


def net_columns(frame: pd.DataFrame) -> list[str]:
    return sorted((c for c in frame.columns if c.startswith(NET_PREFIX)),
                  key=lambda c: int(c.removeprefix(NET_PREFIX)))


def summarize(frame: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Per cell (every axis but `seed`): seed count, seed-level and pooled mean ± std in %."""
    cells = [a for a in axes if a != SEED]
    nets = net_columns(frame)
    if frame.empty or not nets:
        return pd.DataFrame(columns=[*cells, *SUMMARY_COLUMNS])
    rows = []
    groups = frame.groupby(cells, sort=True, dropna=False) if cells else [((), frame)]
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        accuracies = group[nets].to_numpy(dtype=float)
        per_seed = pd.Series([_nanmean(row) for row in accuracies]).dropna()
        pooled = pd.Series(accuracies.ravel()).dropna()
        rows.append({
            **dict(zip(cells, values, strict=True)),
            "n_seeds": len(per_seed),
            "n_nets": len(pooled),
            "seed_level_mean_pct": 100 * per_seed.mean(),
            "seed_level_std_pct": 100 * per_seed.std(ddof=0),
            "pooled_mean_pct": 100 * pooled.mean(),
            "pooled_std_pct": 100 * pooled.std(ddof=0),
        })
    return pd.DataFrame(rows, columns=[*cells, *SUMMARY_COLUMNS])


def _nanmean(values: Any) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def cell_axes(summary: pd.DataFrame) -> list[str]:
    return [c for c in summary.columns if c not in SUMMARY_COLUMNS]


def to_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, accuracies as 'mean ± std'."""
    axes = cell_axes(summary)
    header = [*axes, "seeds", "test acc % seed-level (mean ± std over seeds)",
              "test acc % pooled (mean ± std over all nets)", "nets"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):  # records keep ints as ints, unlike iterrows
        cells = [str(row[a]) for a in axes] + [
            str(row["n_seeds"]),
            f"{row['seed_level_mean_pct']:.2f} ± {row['seed_level_std_pct']:.2f}",
            f"{row['pooled_mean_pct']:.2f} ± {row['pooled_std_pct']:.2f}",
            str(row["n_nets"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _numeric(values: pd.Series) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_axes(summary: pd.DataFrame) -> list[str]:
    """Axes worth a plot: numeric, with at least two values."""
    return [a for a in cell_axes(summary)
            if _numeric(summary[a]) and summary[a].nunique() > 1]


def plot(summary: pd.DataFrame, axis: str, path: Path, title: str = "") -> Path:
    """Seed-level accuracy vs `axis` with std error bars, one line per other-axes combination."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    others = [a for a in cell_axes(summary) if a != axis]
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.add_subplot()
    groups = summary.groupby(others, sort=True, dropna=False) if others else [((), summary)]
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        group = group.sort_values(axis)
        label = ", ".join(f"{a}={v}" for a, v in zip(others, values, strict=True)) or None
        ax.errorbar(group[axis], group["seed_level_mean_pct"], yerr=group["seed_level_std_pct"],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel(axis)
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title(title or f"accuracy vs {axis}")
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def write_report(
    frame: pd.DataFrame, summary: pd.DataFrame, out_dir: Path, name: str = ""
) -> list[Path]:
    """trials.csv, summary.csv, summary.md and one accuracy_vs_<axis>.png per numeric axis."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "trials.csv", out_dir / "summary.csv", out_dir / "summary.md"]
    frame.to_csv(files[0], index=False)
    summary.to_csv(files[1], index=False)
    title = f"# {name}\n\n" if name else ""
    files[2].write_text(title + to_markdown(summary))
    for axis in plot_axes(summary):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", axis)
        files.append(plot(summary, axis, out_dir / f"accuracy_vs_{safe}.png", title=name))
    return files


def log_report(client: Any, run_id: str, summary: pd.DataFrame, files: Sequence[Path]) -> None:
    """The table (browsable in the MLflow UI) and the files, under the parent's `aggregate/`."""
    if not summary.empty:
        client.log_table(run_id, summary, "aggregate/summary.json")
    for path in files:
        client.log_artifact(run_id, str(path), "aggregate")


__all__ = [
    "SUMMARY_COLUMNS",
    "log_report",
    "plot",
    "summarize",
    "to_markdown",
    "trial_frame",
    "write_report",
]
