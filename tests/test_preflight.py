"""A sweep its machine cannot serve is refused before anything starts or is logged: missing
data, an ipc the data cannot fill, resources this machine does not have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
import torch  # noqa: E402
from conftest import stop_shared_ray  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from orchestrator import service, tracking  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.preflight import PreflightError  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402

ENGINE = {"dataset": "digits", "iterations": 2, "model": {"width": 8}}


@pytest.fixture
def bare_home(tmp_path, monkeypatch):
    stop_shared_ray()  # these tests check that a refused launch starts no Ray
    home = tmp_path / "home"
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return home


def refused(tmp_path, home, match: str, engine=None, **fields) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "pre", "engine": {**ENGINE, **(engine or {})},
                                    "grid": {"lam": [0, 0.8]}, **fields}))
    with pytest.raises(PreflightError, match=match):
        service.launch(load_spec(path), progress=False)
    assert not (home / "mlflow.db").exists()  # nothing was logged, no Ray was started
    result = CliRunner().invoke(app, ["launch", str(path)])
    assert result.exit_code == 2 and "nothing was started" in result.output


def test_missing_data_and_an_unfillable_ipc(tmp_path, bare_home):
    refused(tmp_path, bare_home, "dataset ImageFolder: ",
            engine={"dataset": "ImageFolder", "data_root": str(tmp_path / "no-such-folder")})
    refused(tmp_path, bare_home, r"ipc=500 needs at least that many .* smallest class of digits has",
            engine={"ipc": 500})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_resources_this_machine_lacks(tmp_path, bare_home):
    refused(tmp_path, bare_home, "resources.gpu: a trial asks for 1 GPUs, this machine has 0",
            resources={"gpu": 1})
    refused(tmp_path, bare_home, "device: trials ask for cuda, this machine has no GPU",
            engine={"device": "cuda"}, resources={"gpu": 0.5})
    cores = os.cpu_count() or 1
    refused(tmp_path, bare_home, f"asks for {cores + 1} CPUs, this machine has {cores}",
            resources={"cpu": cores + 1})


def test_the_demo_on_a_bare_machine_stops_before_ray_with_the_command(tmp_path, bare_home,
                                                                       monkeypatch):
    """`make demo` where Fashion-MNIST is nowhere (no Debian package, no cache, offline): one
    clear message naming the command, exit 2, no Ray started, no MLflow store created."""
    import ray

    import mim4dd.data as data_module

    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    monkeypatch.setattr(data_module, "DEFAULT_CACHE", tmp_path / "empty-cache")
    monkeypatch.setenv(data_module.OFFLINE_ENV, "1")
    monkeypatch.delenv("MIM4DD_DATA", raising=False)
    quickstart = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["launch", str(quickstart)])
    assert result.exit_code == 2, result.output
    assert "sudo apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.output
    assert not ray.is_initialized() and not (bare_home / "mlflow.db").exists()
