"""The sweep's view in the MLflow UI: its runs sorted by λ, with every swept setting and the
test accuracy as columns, which `mim4dd-sweep ui` links to.

MLflow 3.17's UI keeps a saved view as an experiment tag `mlflow.sharedViewState.<id>`: JSON
{name, createdAt, updatedAt, state}, the state being the runs table's settings as JSON,
zlib-compressed and base64-encoded after "deflate;". This is the UI's own format, not a
documented API (mlflow is pinned); a UI that cannot read it says so and shows its plain table.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Sequence
from typing import Any

from mim4dd.metrics import TEST_ACC_MEAN, TEST_ACC_STD

TAG_PREFIX = "mlflow.sharedViewState."
LINK_PARAM = "viewStateShareKey"
# Without it MLflow 3 opens an experiment in its GenAI layout (traces, judges, prompts).
TRAINING_LAYOUT = "workflowType=machine_learning"
_SORT_FIRST = "lam"  # runs sorted by λ: each λ's seeds side by side (and none nested)


def view_id(sweep: str) -> str:
    return f"mim4dd-{sweep}"


def state(sweep: str, axes: Sequence[str]) -> dict[str, Any]:
    """The runs table of sweep `sweep`: its runs only, a column per axis and the accuracy."""
    sort = _SORT_FIRST if _SORT_FIRST in axes else (axes[0] if axes else None)
    return {
        "searchFilter": f"tags.`mim4dd.sweep` = '{sweep}'",  # sweep names hold no quote
        "orderByKey": f"params.`{sort}`" if sort else "attributes.start_time",
        "orderByAsc": bool(sort),
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": ["attributes.`Dataset`", "attributes.`Version`",
                            *(f"params.`{axis}`" for axis in axes),
                            f"metrics.`{TEST_ACC_MEAN}`", f"metrics.`{TEST_ACC_STD}`"],
    }


def save(client: Any, experiment_id: str, sweep: str, axes: Sequence[str]) -> None:
    """Store (or refresh) the sweep's view in its experiment."""
    packed = zlib.compress(json.dumps(state(sweep, axes)).encode())
    now = int(time.time() * 1000)
    record = {"name": f"{sweep}: λ, seed, accuracy", "createdAt": now, "updatedAt": now,
              "state": "deflate;" + base64.b64encode(packed).decode()}
    client.set_experiment_tag(experiment_id, TAG_PREFIX + view_id(sweep), json.dumps(record))


def link(base_url: str, experiment: Any, sweep: str) -> str:
    """The URL of the sweep's runs table, in its view when the experiment holds one."""
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs"
    if TAG_PREFIX + view_id(sweep) in experiment.tags:
        return f"{url}?{LINK_PARAM}={view_id(sweep)}&{TRAINING_LAYOUT}"
    return f"{url}?{TRAINING_LAYOUT}"


__all__ = ["link", "save", "state", "view_id"]
