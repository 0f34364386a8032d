"""The design-choice table: every variant of a one-factor-at-a-time sweep against the defaults,
paired by seed, chosen on VALIDATION.

Reads the finished trial runs of each named sweep's current config from the store (the ones
`mim4dd-sweep report` counts). A trial's variant is its trial key without the seed; the
defaults are the trials that set nothing but the seed. Per variant: validation and test
accuracy (mean ± std over seeds, population std as `report`) and the paired differences from
the defaults on the same seeds with their 95 % CI (Student t, orchestrator.paired). The rule:
a variant replaces a default only if its validation difference's CI lies above 0; the test
split plays no part in the choice.

    .venv/bin/python docs/results/mim_choices/choose_on_validation.py \
        docs/results/mim_choices/choices.csv mim_choices_dm mim_choices_mtt \
        > docs/results/mim_choices/choices.md
"""

import json
import sys

import pandas as pd

from mim4dd.metrics import TEST_ACC_MEAN, VAL_ACC_MEAN
from orchestrator import paired, queries, tracking

DEFAULTS = "(defaults)"


def trials(name: str) -> pd.DataFrame:
    client, parent = queries.open_sweep(name, None)
    finished = queries.finished_trial_runs(client, parent)
    rows = []
    for run in finished.values():
        overrides = json.loads(run.data.tags[tracking.TAG_OVERRIDES])
        variant = ",".join(f"{k}={v}" for k, v in overrides.items() if k != "seed")
        rows.append({"sweep": name, "variant": variant or DEFAULTS, "seed": overrides["seed"],
                     "val": run.data.metrics.get(VAL_ACC_MEAN),
                     "test": run.data.metrics.get(TEST_ACC_MEAN)})
    return pd.DataFrame(rows)


def table(frame: pd.DataFrame) -> list[dict]:
    defaults = frame[frame.variant == DEFAULTS].set_index("seed")
    out = []
    order = sorted(frame.variant.unique(), key=lambda v: (v != DEFAULTS, not v.startswith("lam="), v))
    for variant in order:  # the defaults, then the base alone, then each factor's values
        cell = frame[frame.variant == variant]
        cell = cell.set_index("seed")
        row = {"sweep": cell.sweep.iloc[0], "variant": variant, "n_seeds": len(cell),
               "val_mean_pct": cell.val.mean(), "val_std_pct": cell.val.std(ddof=0),
               "test_mean_pct": cell.test.mean(), "test_std_pct": cell.test.std(ddof=0)}
        for split in ("val", "test"):
            diffs = (cell[split] - defaults[split]).dropna().tolist()
            stats = paired.paired(diffs) if variant != DEFAULTS and diffs else {}
            row[f"{split}_diff_mean_pp"] = stats.get(paired.DIFF_MEAN)
            row[f"{split}_diff_ci95_low_pp"] = stats.get(paired.DIFF_LOW)
            row[f"{split}_diff_ci95_high_pp"] = stats.get(paired.DIFF_HIGH)
        low = row["val_diff_ci95_low_pp"]
        row["replaces_default"] = bool(low is not None and low > 0)
        out.append(row)
    return out


def pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def diff(row: dict, split: str) -> str:
    mean = row[f"{split}_diff_mean_pp"]
    if mean is None:
        return "—"
    low, high = row[f"{split}_diff_ci95_low_pp"], row[f"{split}_diff_ci95_high_pp"]
    return f"{mean:+.2f}" if pd.isna(low) else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


out_csv, names = sys.argv[1], sys.argv[2:]
rows = [row for name in names for row in table(trials(name))]
pd.DataFrame(rows).to_csv(out_csv, index=False)
print("| sweep | variant | seeds | validation % | test % | Δ validation vs defaults, pp "
      "[95 % CI] | Δ test vs defaults, pp [95 % CI] | replaces the default |")
print("|---|---|--:|--:|--:|--:|--:|:-:|")
for row in rows:
    print(f"| {row['sweep']} | {row['variant']} | {row['n_seeds']} "
          f"| {pm(row['val_mean_pct'], row['val_std_pct'])} "
          f"| {pm(row['test_mean_pct'], row['test_std_pct'])} | {diff(row, 'val')} "
          f"| {diff(row, 'test')} | {'yes' if row['replaces_default'] else 'no'} |")
