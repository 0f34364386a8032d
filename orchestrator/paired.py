"""Does MIM help? Each cell against its λ = 0 twin, paired by seed.

The twin of a cell is the cell with the same settings but λ = 0 (the base method alone). A seed
fixes the initial images and the evaluation networks' seeds, so the seed's two runs share
much of their luck; the difference per seed, d_s = acc(cell, s) − acc(twin, s), cancels it.
Over the n seeds both cells ran: mean(d) and its 95 % confidence interval
mean(d) ± t(0.975, n − 1) · sd(d) / √n (Student t; sd with n − 1). With one pair there is a
difference but no interval; a λ = 0 cell, or a cell without a twin, has no difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence

import pandas as pd

LAM = "lam"
N_PAIRS = "n_pairs"
DIFF_MEAN, DIFF_LOW, DIFF_HIGH = (
    "diff_vs_lam0_mean_pct", "diff_vs_lam0_ci95_low_pct", "diff_vs_lam0_ci95_high_pct"
)
COLUMNS = [N_PAIRS, DIFF_MEAN, DIFF_LOW, DIFF_HIGH]

# t(0.975, df) where scipy is missing; between entries the smaller df's (wider) value is used.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (df ≥ 1)."""
    try:
        from scipy.stats import t
    except ImportError:
        return _T975[max(k for k in _T975 if k <= df)]
    return float(t.ppf(0.975, df))


def paired(diffs: Sequence[float]) -> dict[str, float]:
    """n, mean and 95 % confidence interval of per-seed differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {N_PAIRS: n, DIFF_MEAN: mean, DIFF_LOW: mean - half, DIFF_HIGH: mean + half}


def versus_baseline(
    per_seed: dict[tuple[Hashable, ...], pd.Series], cells: Sequence[str]
) -> dict[tuple[Hashable, ...], dict[str, float]]:
    """`paired` stats of every cell with a λ = 0 twin.

    `per_seed` maps a cell's values (in the order of `cells`) to its accuracy per seed (a
    Series indexed by seed). Without a `lam` axis there is nothing to compare."""
    if LAM not in cells:
        return {}
    at = list(cells).index(LAM)
    found = {}
    for values, accuracy in per_seed.items():
        if _is_zero(values[at]):
            continue
        twin = per_seed.get((*values[:at], 0.0, *values[at + 1:]))
        if twin is None:
            continue
        diffs = (accuracy - twin).dropna()  # aligned by seed: only seeds both cells ran
        if len(diffs):
            found[values] = paired(diffs.tolist())
    return found


def _is_zero(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


__all__ = ["COLUMNS", "DIFF_HIGH", "DIFF_LOW", "DIFF_MEAN", "N_PAIRS", "paired", "t975",
           "versus_baseline"]
