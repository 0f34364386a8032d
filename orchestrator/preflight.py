"""What can be refused before a sweep starts anything: data a trial could not load, an ipc its
data cannot fill, resources no machine of the cluster has. Each would otherwise fail every
trial (a missing dataset), or leave trials pending forever (a GPU that is not there).
"""

from __future__ import annotations

import os
from typing import Any

from mim4dd.data import load_once
from orchestrator.expand import Trial
from orchestrator.spec import Resources


class PreflightError(RuntimeError):
    """The sweep cannot run as given; nothing was started. One line per problem."""


def check_data(trials: list[Trial]) -> None:
    """Load each distinct dataset the trials read once (downloading what torchvision can, so
    trials find it cached) and check every ipc against its smallest class."""
    problems: list[str] = []
    loaded: dict[tuple, Any] = {}
    for trial in trials:
        data = load_once(trial.config, loaded)
        if isinstance(data, Exception):
            problems.append(f"dataset {trial.config.dataset}: {data}")
        elif trial.config.init == "real" and (why := data.ipc_problem(trial.config.ipc)):
            problems.append(f"trial {trial.key}: {why}")
    if problems:
        raise PreflightError("\n".join(dict.fromkeys(problems)))


def check_local_resources(resources: Resources, trials: list[Trial]) -> None:
    """The embedded cluster is this machine: a trial must fit its cores and GPUs."""
    import torch

    gpus = torch.cuda.device_count()
    _check_fit(resources, trials, {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)},
               "this machine")


def check_cluster_resources(resources: Resources, trials: list[Trial]) -> None:
    """Ray is connected: a trial must fit at least one alive node."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    best = {kind: max((n.get(kind, 0.0) for n in nodes), default=0.0) for kind in ("CPU", "GPU")}
    _check_fit(resources, trials, best, "the largest node of the cluster")


def _check_fit(
    resources: Resources, trials: list[Trial], has: dict[str, float], where: str
) -> None:
    problems = []
    if resources.cpu > has["CPU"]:
        problems.append(f"resources.cpu: a trial asks for {resources.cpu:g} CPUs, {where} has "
                        f"{has['CPU']:g}")
    if resources.gpu > has["GPU"]:
        problems.append(f"resources.gpu: a trial asks for {resources.gpu:g} GPUs, {where} has "
                        f"{has['GPU']:g}")
    cuda = sorted({t.config.device for t in trials if t.config.device.startswith("cuda")})
    if cuda and not has["GPU"]:
        problems.append(f"device: trials ask for {', '.join(cuda)}, {where} has no GPU")
    if problems:
        raise PreflightError("\n".join(problems) + "\n(trials would wait for them forever)")


__all__ = ["PreflightError", "check_cluster_resources", "check_data", "check_local_resources"]
