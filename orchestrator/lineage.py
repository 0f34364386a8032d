"""Where a result comes from, as MLflow shows it: the code (git commit, package versions), the
sweep (its file and its grid), the data (dataset inputs with a digest) and what a trial is.

Nothing here may fail a launch: without git, outside a checkout or with a package missing,
that part of the record is left out.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Dataset, DatasetInput, InputTag

if TYPE_CHECKING:
    from mim4dd.data import RealData, Split
    from orchestrator.expand import Trial
    from orchestrator.spec import SweepSpec

# MLflow's own tags: its runs table shows them as the Source and Version columns.
TAG_SOURCE_NAME, TAG_SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
TAG_GIT_COMMIT, TAG_GIT_BRANCH = "mlflow.source.git.commit", "mlflow.source.git.branch"
TAG_GIT_DIRTY = "mim4dd.git_dirty"  # "true": tracked files differed from the commit
TAG_CONTEXT = "mlflow.data.context"  # which use of a dataset input (training, test, ...)
SWEEP_FILE = "sweep.yaml"  # the sweep file as launched, in the parent run's artifacts
GRID_PARAM = "grid."  # parent-run params: grid.<dotted path> = the axis's values as JSON
_CHECKOUT = Path(__file__).resolve().parents[1]  # a git checkout when run from a clone
_DIGEST_SAMPLE = 64  # images per split that enter the digest, besides every label


def versions() -> dict[str, str]:
    found = {}
    for package in ("mim4dd", "torch", "ray", "mlflow"):
        try:
            found[f"mim4dd.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[f"mim4dd.version.{package}"] = "unknown"
    return found


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_tags(sweep_file: str | Path | None = None) -> dict[str, str]:
    """The sweep file and, when this code runs from a git checkout, its commit and branch."""
    tags = {TAG_SOURCE_TYPE: "LOCAL"}
    if sweep_file:
        tags[TAG_SOURCE_NAME] = str(sweep_file)
    # Only the checkout the code itself lives in: an installed package inside some other
    # repository (a venv in a clone) must not claim that repository's commit.
    if _git("rev-parse", "--show-toplevel") == str(_CHECKOUT) and (
        commit := _git("rev-parse", "HEAD")
    ):
        tags[TAG_GIT_COMMIT] = commit
        tags[TAG_GIT_BRANCH] = _git("rev-parse", "--abbrev-ref", "HEAD") or ""
        changed = _git("status", "--porcelain", "--untracked-files=no")
        tags[TAG_GIT_DIRTY] = "unknown" if changed is None else str(bool(changed)).lower()
    return tags


def axes(spec: SweepSpec) -> list[str]:
    """Every setting the sweep varies (dotted paths): its grid's, then what `variants` and
    `include` add."""
    found: list[str] = []
    for trial in spec.trials():
        found += [path for path in trial.overrides if path not in found]
    return found


def grid_params(spec: SweepSpec) -> dict[str, str]:
    """The sweep's grid as params of its parent run: one per axis, plus its extra rows."""
    params = {f"{GRID_PARAM}{path}": json.dumps(values) for path, values in spec.grid.items()}
    for rows in ("variants", "include", "exclude"):
        if getattr(spec, rows):
            params[f"{GRID_PARAM}{rows}"] = json.dumps(getattr(spec, rows))[:6000]
    return params


def describe_sweep(spec: SweepSpec) -> str:
    """The parent run's description (Markdown): the sweep's own, then where its answer is."""
    axes = "; ".join(f"{path} ∈ {json.dumps(values)}" for path, values in spec.grid.items())
    return (f"{spec.description}\n\n" if spec.description else "") + (
        f"Sweep **{spec.name}**: {len(spec.trials())} trials ({axes}), one child run each.\n\n"
        "**Results** per grid cell, over seeds, as metrics of this run "
        "(`cell/<axis>_<value>/...`):\n\n"
        "- `seed_level_mean_pct` ± `seed_level_std_pct`: test accuracy (%), mean ± std;\n"
        "- `val_mean_pct` ± `val_std_pct`: validation accuracy (%); `chosen_on_val` = 1: the "
        "λ the validation split picks among cells differing only in λ;\n"
        "- `diff_vs_lam0_mean_pct` [`diff_vs_lam0_ci95_low_pct`, `diff_vs_lam0_ci95_high_pct`]:"
        " the difference from the same seeds at λ = 0, in points, with its paired 95 % "
        "confidence interval.\n\n"
        "The same as a table: artifact `aggregate/summary.json`; as a plot: "
        f"`aggregate/accuracy_vs_<axis>.png`; in a terminal: `mim4dd-sweep report {spec.name}`."
    )


def describe_trial(sweep: str, trial: Trial) -> str:
    """The child run's description (Markdown): what the trial is, where its results are."""
    c = trial.config
    method = (f"{c.base.upper()} + MIM (λ = {c.lam:g})" if c.lam
              else f"{c.base.upper()} alone (λ = 0, the baseline)")
    headline, *others = c.eval.models
    also = (f" The other architectures' are `eval/<architecture>/...` ({', '.join(others)})."
            if others else "")
    return (
        f"Trial `{trial.key}` of sweep **{sweep}**: {method} on {c.dataset}, {c.ipc} synthetic "
        f"image(s) per class, seed {c.seed}, {c.iterations} iterations.\n\n"
        f"Result: `eval/test_acc_mean_pct`, the mean test accuracy (%) of {c.eval.num_nets} "
        f"fresh {headline} networks trained {c.eval.epochs} epochs on the synthetic set.{also} "
        "The set is in the artifacts (`synset/`) and previewed under images."
    )


def split_digest(data: RealData, split: Split) -> str:
    """A cheap fingerprint of a split as the trial sees it: its shape, every label and an
    evenly spaced sample of its images (hashing every image of CIFAR-100, 600 MB, would cost
    each trial seconds)."""
    digest = hashlib.sha256(json.dumps(
        [data.info.name, list(split.images.shape), data.info.mean, data.info.std]).encode())
    digest.update(split.labels.cpu().numpy().tobytes())
    every = max(1, len(split) // _DIGEST_SAMPLE)
    digest.update(split.images[::every].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def dataset_inputs(data: RealData) -> list[DatasetInput]:
    """MLflow dataset inputs of a trial: the train split it distils from, the validation and
    test splits its evaluation measures on."""
    source = json.dumps({"uri": str(data.root) if data.root else f"mim4dd:{data.info.name}"})
    inputs = []
    for split, context in ((data.train, "training"), (data.val, "validation"),
                           (data.test, "test")):
        if not len(split):
            continue
        profile = {"num_rows": len(split), "image_shape": list(split.images.shape[1:])}
        dataset = Dataset(data.info.name, split_digest(data, split), "local", source,
                          profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag(TAG_CONTEXT, context)]))
    return inputs


__all__ = ["SWEEP_FILE", "axes", "dataset_inputs", "describe_sweep", "describe_trial",
           "grid_params", "source_tags", "split_digest", "versions"]
