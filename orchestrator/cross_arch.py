"""The cross-architecture table: how a sweep's sets train networks they were not distilled with.

Rows are the cells of the main table, columns the architectures of `eval.models`. Each
architecture's numbers are `aggregate.summarize` run on that architecture's networks alone, so
seed-level mean ± std (and, with a λ axis, the paired difference from λ = 0) mean exactly what
they mean in the main table. In csv and json every architecture's columns are
`<arch>/<summary column>` (e.g. `resnet18/seed_level_mean_pct`), beside the main columns; a
sweep with `random_baseline` adds each architecture's paired improvement over random real images
(`<arch>/diff_vs_random_mean_pct`, `orchestrator.versus_random`).

The table exists when the trials logged per-architecture metrics: the engine names them for
any evaluation but the default ConvNet alone (`EvalResult.per_architecture`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from orchestrator import aggregate, paired, versus_random

_ARCH_NET = re.compile(r"^([a-z0-9_]+)/(test_acc_net\d+_pct)$")  # a trial frame's column
COLUMNS = ["n_seeds", "seed_level_mean_pct", "seed_level_std_pct", *paired.COLUMNS,
           versus_random.DIFF_MEAN]
TITLE = "test accuracy % per architecture (seed-level mean ± std over seeds)"


def architectures(frame: pd.DataFrame) -> list[str]:
    """The architectures with per-network columns in a trial frame, in the pool's order."""
    found = {m[1] for c in frame.columns if (m := _ARCH_NET.match(str(c)))}
    if not found:
        return []
    from mim4dd.zoo import ARCHITECTURES  # torch: only a cross-architecture sweep pays for it

    pool = list(ARCHITECTURES)
    return sorted(found, key=lambda a: (pool.index(a) if a in pool else len(pool), a))


def column(arch: str, name: str) -> str:
    return f"{arch}/{name}"


def summarize(frame: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """Per cell: every architecture's `COLUMNS`; an empty frame without per-architecture
    metrics. A trial that did not evaluate an architecture (yet) does not count for it."""
    archs = architectures(frame)
    if not archs:
        return pd.DataFrame(columns=cells)
    base = frame[[*cells, aggregate.SEED]]
    table = None
    for arch in archs:
        nets = {c: _ARCH_NET.match(str(c))[2] for c in frame.columns
                if (m := _ARCH_NET.match(str(c))) and m[1] == arch}
        # The architecture's networks (and random baseline) under the names
        # aggregate.summarize reads.
        random = column(arch, versus_random.FRAME_COLUMN)
        nets |= {random: versus_random.FRAME_COLUMN} if random in frame else {}
        own = aggregate.summarize(base.join(frame[list(nets)].rename(columns=nets)), cells)
        own = own[[*cells, *COLUMNS]].rename(columns={c: column(arch, c) for c in COLUMNS})
        # Same frame, same cells: every architecture's rows come in the same order.
        table = own if table is None else pd.concat([table, own.drop(columns=cells)], axis=1)
    return table


def merged(summary: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The main summary with the architectures' columns appended, cell by cell."""
    cells = aggregate.cell_axes(summary)
    if table.empty:
        return summary
    if not cells:  # one cell: one row each
        return pd.concat([summary.reset_index(drop=True),
                          table.reset_index(drop=True)], axis=1)
    return summary.merge(table, on=cells, how="left")


def display_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """The table for people: cells, then "mean ± std" per architecture; an architecture that
    fewer seeds of the cell were evaluated on says how many."""
    archs = [c.split("/")[0] for c in table.columns if c.endswith("/n_seeds")]
    cells = [c for c in table.columns if "/" not in str(c)]
    rows = []
    for row in table.to_dict("records"):
        shown = {c: aggregate.number_text(row[c]) for c in cells}
        most = max(row[column(a, "n_seeds")] for a in archs)
        for arch in archs:
            seeds = row[column(arch, "n_seeds")]
            mean = row[column(arch, "seed_level_mean_pct")]
            std = row[column(arch, "seed_level_std_pct")]
            text = f"{mean:.2f} ± {std:.2f}" if seeds else ""
            if 0 < seeds < most:
                text += f" ({seeds} of {most} seeds)"
            if not pd.isna(diff := row.get(column(arch, versus_random.DIFF_MEAN))):
                text += f" (Δ vs random {diff:+.2f})"
            shown[arch] = text
        rows.append(shown)
    return rows


def to_markdown(table: pd.DataFrame) -> str:
    rows = display_rows(table)
    header = list(rows[0]) if rows else list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r.values()) + " |" for r in rows)]) + "\n"


def write(table: pd.DataFrame, out_dir: Path, name: str = "") -> list[Path]:
    """architectures.csv and architectures.md beside the main report; none when empty."""
    if table.empty:
        return []
    files = [out_dir / "architectures.csv", out_dir / "architectures.md"]
    table.to_csv(files[0], index=False)
    files[1].write_text(f"# {name}: {TITLE}\n\n" + to_markdown(table))
    return files


__all__ = ["COLUMNS", "TITLE", "architectures", "column", "display_rows", "merged",
           "summarize", "to_markdown", "write"]
