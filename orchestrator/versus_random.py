"""Did distilling beat random real images? Each cell against its random-real baseline, by seed.

A sweep launched with `random_baseline: true` logs, per trial, the same evaluation of as many
random real training images (mim4dd/baseline.py): the images a distillation with that seed
starts from. Per cell: the baseline's accuracy, mean ± std over seeds, and the improvement
over it, d_s = acc(cell, s) − acc(random, s), mean ± std over the seeds that have both (paired:
a seed's two numbers share its evaluation networks' seeds). Population std, as everywhere in the
report; percentages and percentage points.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from mim4dd.metrics import RANDOM_TEST_ACC_MEAN

TRIAL_METRIC = RANDOM_TEST_ACC_MEAN
FRAME_COLUMN = "random_acc_pct"  # a trial's baseline: mean over its headline networks
RANDOM_MEAN, RANDOM_STD = "random_mean_pct", "random_std_pct"
DIFF_MEAN, DIFF_STD = "diff_vs_random_mean_pct", "diff_vs_random_std_pct"
COLUMNS = [RANDOM_MEAN, RANDOM_STD, DIFF_MEAN, DIFF_STD]
LEGEND = ("random: the same evaluation of as many random real training images (the seed's "
          "starting images), mean ± std over seeds; Δ vs random: the paired per-seed "
          "improvement over it, mean ± std, in percentage points.")


def trial_value(metrics: dict[str, float]) -> float:
    """A trial run's baseline accuracy; NaN when it logged none."""
    return metrics.get(TRIAL_METRIC, math.nan)


def versus_random(accuracy: pd.Series, random: pd.Series) -> dict[str, float]:
    """`COLUMNS` of a cell from its accuracy and its baseline per seed (Series by seed)."""
    random = random.dropna()
    diffs = (accuracy - random).dropna()  # aligned by seed: only seeds with both
    return {RANDOM_MEAN: random.mean() if len(random) else math.nan,
            RANDOM_STD: random.std(ddof=0) if len(random) else math.nan,
            DIFF_MEAN: diffs.mean() if len(diffs) else math.nan,
            DIFF_STD: diffs.std(ddof=0) if len(diffs) else math.nan}


def display(row: dict[str, Any]) -> dict[str, str]:
    """The report's two columns of a summary row ("" where the cell has no baseline)."""
    def text(mean: str, std: str, sign: str = "") -> str:
        return "" if math.isnan(row[mean]) else f"{row[mean]:{sign}.2f} ± {row[std]:.2f}"

    return {"random % (mean ± std)": text(RANDOM_MEAN, RANDOM_STD),
            "Δ vs random, pp (mean ± std)": text(DIFF_MEAN, DIFF_STD, "+")}


__all__ = ["COLUMNS", "DIFF_MEAN", "DIFF_STD", "FRAME_COLUMN", "LEGEND", "RANDOM_MEAN",
           "RANDOM_STD", "TRIAL_METRIC", "display", "trial_value", "versus_random"]
