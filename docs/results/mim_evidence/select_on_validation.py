"""The evidence table: per base, the best lambda > 0 on VALIDATION, its TEST accuracy vs lambda 0.

`mim4dd-sweep report` gives each cell's validation mean and the lam it picks (lam 0 included);
this adds the paired validation differences and the best lam > 0. It reads the sweep's finished trial runs of its
current config from the store (the same ones `report` counts) and writes, per base and lam:
validation and test accuracy (mean ± std over seeds, population std as `report`), the paired
test and validation differences from lam 0 on the same seeds with their 95 % CI (Student t,
orchestrator.paired), and which lam > 0 the validation accuracy picks. The test split plays no
part in the choice.

    .venv/bin/python docs/results/mim_evidence/select_on_validation.py mim_evidence \
        docs/results/mim_evidence/selection.csv > docs/results/mim_evidence/selection.md
"""

import sys

import pandas as pd

from mim4dd.metrics import TEST_ACC_MEAN, VAL_ACC_MEAN
from orchestrator import paired, queries, tracking

name, out_csv = sys.argv[1], sys.argv[2]
client, parent = queries.open_sweep(name, None)
finished = queries.finished_trial_runs(client, parent)
rows = []
for run in finished.values():
    values = tracking.trial_values(run)
    rows.append({"base": values["base"], "lam": float(values["lam"]), "seed": int(values["seed"]),
                 "val": run.data.metrics.get(VAL_ACC_MEAN), "test": run.data.metrics.get(TEST_ACC_MEAN)})
frame = pd.DataFrame(rows)

out = []
for base in ["dm", "dc", "mtt", "cafe"]:
    of_base = frame[frame.base == base]
    if of_base.empty:
        continue
    zero = of_base[of_base.lam == 0].set_index("seed")
    cells = []
    for lam, cell in sorted(of_base.groupby("lam")):
        cell = cell.set_index("seed")
        row = {"base": base, "lam": lam, "n_seeds": len(cell),
               "val_mean_pct": cell.val.mean(), "val_std_pct": cell.val.std(ddof=0),
               "test_mean_pct": cell.test.mean(), "test_std_pct": cell.test.std(ddof=0)}
        for split in ("test", "val"):
            diffs = (cell[split] - zero[split]).dropna().tolist() if lam else []
            stats = paired.paired(diffs) if diffs else {}
            row[f"{split}_diff_mean_pp"] = stats.get(paired.DIFF_MEAN)
            row[f"{split}_diff_ci95_low_pp"] = stats.get(paired.DIFF_LOW)
            row[f"{split}_diff_ci95_high_pp"] = stats.get(paired.DIFF_HIGH)
            row["n_pairs"] = stats.get(paired.N_PAIRS, 0) if lam else 0
        cells.append(row)
    candidates = [r for r in cells if r["lam"] > 0]
    chosen = max(candidates, key=lambda r: r["val_mean_pct"])["lam"] if candidates else None
    for row in cells:
        row["best_above_0_on_validation"] = row["lam"] == chosen
    out += cells

table = pd.DataFrame(out)
table.to_csv(out_csv, index=False)


def pm(mean, std):
    return f"{mean:.2f} ± {std:.2f}"


def diff(row, split):
    if not row["lam"]:
        return "—"
    low, high = row[f"{split}_diff_ci95_low_pp"], row[f"{split}_diff_ci95_high_pp"]
    text = f"{row[f'{split}_diff_mean_pp']:+.2f}"
    return text if pd.isna(low) else f"{text} [{low:+.2f}, {high:+.2f}]"


print("| base | λ (relative) | seeds | validation % | test % | Δ validation vs λ = 0, pp [95 % CI] "
      "| Δ test vs λ = 0, pp [95 % CI] |")
print("|---|--:|--:|--:|--:|--:|--:|")
for row in out:
    best = row["best_above_0_on_validation"]
    lam = f"{row['lam']:g}" + (" (best λ > 0 on val)" if best else "")
    print(f"| {row['base']} | {lam} | {row['n_seeds']} | {pm(row['val_mean_pct'], row['val_std_pct'])} "
          f"| {pm(row['test_mean_pct'], row['test_std_pct'])} | {diff(row, 'val')} | {diff(row, 'test')} |")
