"""Shared fixtures: tiny real datasets, loaded once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mim4dd.config import Config
from mim4dd.data import load_dataset
from mim4dd.datasets import DEBIAN_FASHION_MNIST

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the machine's cores: torch's default (a thread per core) in each
    # oversubscribes them, and its idle threads spin (the suite measured ~10 % more CPU).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _read_commands_leave_http_settings(monkeypatch):
    """A read command run in-process (CliRunner) makes MLflow's HTTP client impatient for the
    whole process (`retrying.impatient_http`); each test starts from the settings it had."""
    from orchestrator import retrying
    from orchestrator.retrying import IMPATIENT_HTTP

    monkeypatch.setattr(retrying, "_impatient", retrying._impatient)
    for name in IMPATIENT_HTTP:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits: real, offline, 1,172 train / 125 val / 500 test images."""
    return load_dataset("digits", val_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST from Debian's dataset-fashion-mnist package (CI installs it)."""
    if not DEBIAN_FASHION_MNIST.is_dir() and not os.environ.get("CI"):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return load_dataset("FashionMNIST", val_fraction=0.1, seed=0)


def run_interrupted(config: Config, data, state_file: Path, stop_at: int):
    """Distill to `stop_at`, save the state, and finish in a fresh Distiller (as a new process
    would); returns the finished set, to compare with an uninterrupted run."""
    from mim4dd.distill import Distiller

    first = Distiller(config.model_copy(update={"iterations": stop_at}), data)
    first.run()
    first.save_state(state_file)
    resumed = Distiller(config, data)
    resumed.load_state(state_file)
    assert resumed.iteration == stop_at
    return resumed.run()


def tiny_config(**overrides) -> Config:
    """A distillation that takes well under a second per step on the digits."""
    base = dict(
        dataset="digits", ipc=2, iterations=4, batch_real=16, lam=0.8, seed=0,
        model={"width": 8}, eval={"epochs": 3, "num_nets": 2, "batch_size": 64},
    )
    base.update(overrides)
    return Config.model_validate(base)


# --- the sweep service: a real local Ray cluster and an isolated MLflow store per test ------


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database: copying it saves each test MLflow's ~8 s setup."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def home(tmp_path, monkeypatch, template_db) -> Path:
    """MIM4DD_HOME in tmp_path, holding a fresh copy of the template store."""
    from orchestrator import tracking

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(template_db, home / "mlflow.db")
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return home


@pytest.fixture(scope="session")
def _ray_session_end():
    """Stops the shared Ray cluster when the test session ends."""
    yield
    stop_shared_ray()


@pytest.fixture
def ray_cluster(_ray_session_end):
    """The in-process local Ray cluster every test shares (listening on loopback only): started
    by the first test that asks for it, and again after a test that needs Ray down stopped it
    (`stop_shared_ray`). Tests whose subject is a crash or a restart start their own."""
    import ray

    from orchestrator import tune_run

    if not ray.is_initialized():
        for name, value in tune_run.RAY_ENV.items():
            os.environ.setdefault(name, value)
        tune_run.start_local(
            num_cpus=2, log_to_driver=False, runtime_env={"env_vars": dict(tune_run.RAY_ENV)},
        )


def stop_shared_ray() -> None:
    """For a test that needs no Ray running in this process (the next `ray_cluster` restarts it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def use_plugin(monkeypatch, plugin: Path) -> None:
    """$MIM4DD_PLUGINS names `plugin` (a .py file) for this test; the base registry is restored
    afterwards, so the bases it registers do not outlive the test."""
    from mim4dd import bases

    monkeypatch.setattr(bases, "_registry", dict(bases._registry))
    monkeypatch.setattr(bases, "_loaded_plugins", set())
    monkeypatch.setenv(bases.PLUGINS_ENV, str(plugin))


def mim_share_of_first_step(make) -> tuple[float, float, float]:
    """For distillers `make()` builds alike: the MIM term's share of the image gradient the
    first step applied, measured from the images' change (|G - grad L_base| / |grad L_base|,
    G = (before - after) / lr_img: plain SGD's first step), the step's own `mim_grad_ratio`,
    and |grad L_MIM| / |grad L_base| computed directly by autograd."""
    probe = make()
    base, mim, _ = probe.terms(probe.batch(0))
    base_grad = torch.autograd.grad(base, probe.images, retain_graph=True)[0]
    mim_grad = torch.autograd.grad(mim, probe.images)[0]
    stepped = make()
    before = stepped.images.detach().clone()
    metrics = stepped.step()
    applied = (before - stepped.images.detach()) / stepped.config.lr_img
    share = float((applied - base_grad).norm() / base_grad.norm())
    return share, metrics["mim_grad_ratio"], float(mim_grad.norm() / base_grad.norm())


def first_batch_loss_and_base(distiller):
    """On the first batch: the total loss and L_base, each with its image gradient, and the
    loss parts (for the "lambda = 0 is exactly the base method" checks of every base)."""
    base = distiller.objective.match(distiller.batch(0), with_features=False).base_loss
    (base_grad,) = torch.autograd.grad(base, distiller.images)
    loss, metrics = distiller.loss(distiller.batch(0))
    (grad,) = torch.autograd.grad(loss, distiller.images)
    return loss, base, grad, base_grad, metrics
