"""The expert stage of the sweep service: real Ray tasks, real MLflow, tiny digits buffers.

Buffers are 2 experts x 2 epochs of an 8-channel ConvNet on scikit-learn's digits, in tmp_path;
MLflow lives in tmp_path too (MIM4DD_HOME). The Ray cluster and store fixtures are in conftest.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mim4dd.experts import MANIFEST_FILE, ExpertBuffer, ExpertBufferError  # noqa: E402
from mim4dd.synset import SyntheticSet  # noqa: E402
from orchestrator import experts, queries, service, tracking  # noqa: E402
from orchestrator.cli import app  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MTT = {
    "base": "mtt", "dataset": "digits", "model": {"width": 8}, "ipc": 1, "batch_real": 16,
    "num_experts": 2, "expert_train_epochs": 2, "syn_steps": 2, "expert_epochs": 1,
    "max_start_epoch": 1, "iterations": 2, "eval": {"epochs": 2, "num_nets": 1},
}


def mtt_spec(tmp_path: Path, name: str, grid: dict, **base) -> Path:
    spec = {"name": name, "engine": {**MTT, "expert_dir": str(tmp_path / "experts"), **base},
            "grid": grid}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("expert_*.safetensors")}


def buffer_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return tracking.search_all(client, ids, "tags.`mim4dd.role` = 'experts'")


@pytest.mark.slow
def test_sweeps_share_one_buffer_trained_once(ray_cluster, home, tmp_path):
    folder = tmp_path / "experts"
    first = load_spec(mtt_spec(tmp_path, "first", {"lam": [0.8]}))
    outcome = service.launch(first, progress=False, console=Console(file=io.StringIO()))
    assert outcome.status == "FINISHED" and outcome.finished == ["lam=0.8"], outcome.failed
    trained = stamps(folder)
    assert sorted(trained) == ["expert_0.safetensors", "expert_1.safetensors"]
    digest = json.loads((folder / MANIFEST_FILE).read_text())["digest"]

    client = MlflowClient(tracking.resolve_tracking_uri())
    [logged] = buffer_runs(client)  # the sealed buffer's manifest, in the sweep's experiment
    assert logged.data.tags[tracking.TAG_EXPERTS] == digest
    assert logged.data.params["count"] == "2" and logged.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(logged.info.run_id)] == ["manifest.json"]
    parent = tracking.find_sweep_run(client, "first")
    assert parent.data.tags[tracking.TAG_BUFFERS] == digest
    for run in tracking.child_runs(client, parent):  # the end to end mtt trials
        assert run.info.status == "FINISHED"
        synset = SyntheticSet.load(queries.pull(run.info.run_id, tmp_path / run.info.run_id))
        assert synset.lr is not None and float(synset.lr) > 0  # the learned step size

    # another sweep with the same expert key: nothing is retrained, nothing logged again
    second = load_spec(mtt_spec(tmp_path, "second", {"lam": [0]}, seed=1))
    log = io.StringIO()
    again = service.launch(second, progress=False, console=Console(file=log, width=200))
    assert again.status == "FINISHED" and again.finished == ["lam=0"]
    assert f"experts {digest}: reusing" in log.getvalue()
    assert stamps(folder) == trained
    assert len(buffer_runs(client)) == 1


@pytest.mark.slow
def test_partial_buffer_is_detected_and_completed(ray_cluster, home, tmp_path):
    folder = tmp_path / "experts"
    path = mtt_spec(tmp_path, "partial", {"lam": [0.8]})
    spec = load_spec(path)
    result = CliRunner().invoke(app, ["experts", str(path)])
    assert result.exit_code == 0, result.output
    assert "expert buffers ready" in result.output
    kept = stamps(folder)["expert_0.safetensors"]

    (folder / "expert_1.safetensors").unlink()  # as if a node lost a file
    with pytest.raises(ExpertBufferError, match="missing or truncated"):
        ExpertBuffer.open(folder, json.loads((folder / MANIFEST_FILE).read_text())["key"], 2)
    dry = CliRunner().invoke(app, ["launch", str(path), "--dry-run"])
    assert dry.exit_code == 0 and "partial" in dry.output and "1 of 2" in dry.output, dry.output

    [buffer] = service.prepare_experts(spec, Console(file=io.StringIO()))
    assert buffer.trained == [1] and buffer.state == experts.COMPLETE
    assert stamps(folder)["expert_0.safetensors"] == kept  # the valid expert is not retrained

    cut = folder / "expert_0.safetensors"  # a truncated file of the right name
    cut.write_bytes(cut.read_bytes()[:-64])
    [buffer] = service.prepare_experts(spec, Console(file=io.StringIO()))
    assert buffer.trained == [0]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert ExpertBuffer.open(folder, manifest["key"], min_count=2).count == 2


@pytest.mark.slow
def test_unusable_buffer_fails_the_launch_before_any_trial(ray_cluster, home, tmp_path):
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps({"key": {"dataset": "other"},
                                                    "digest": "0123456789abcdef"}))
    path = mtt_spec(tmp_path, "refused", {"lam": [0.8]})
    result = CliRunner().invoke(app, ["launch", str(path)])
    assert result.exit_code == 1, result.output
    assert "expert stage failed; no trial was started" in result.output
    assert "sealed for other settings (digest 0123456789abcdef)" in result.output
    client = MlflowClient(tracking.resolve_tracking_uri())
    parent = tracking.find_sweep_run(client, "refused")
    assert parent.info.status == "FAILED" and not tracking.child_runs(client, parent)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_FILE]  # left as it was


def test_trials_are_grouped_by_buffer(tmp_path):
    # lam and seed leave the key alone; a width changes it, and one folder cannot hold two keys
    same = load_spec(mtt_spec(tmp_path, "same", {"lam": [0, 0.8], "seed": [0, 1]}))
    [row] = experts.describe(same.trials())
    assert row["trials"] == 4 and row["state"] == experts.MISSING and row["experts"] == 2
    clash = load_spec(mtt_spec(tmp_path, "clash", {"model.width": [8, 16]}))
    [row] = experts.describe(clash.trials())
    assert row["state"] == experts.REFUSED and "same expert_dir" in row["detail"]
    split = load_spec(mtt_spec(tmp_path, "split", {"model.width": [8, 16]}, expert_dir=None))
    assert len({r["buffer"] for r in experts.describe(split.trials())}) == 2


def test_bases_comparison_names_each_base_with_its_preset():
    spec = load_spec(ROOT / "sweeps" / "bases_comparison.yaml")
    trials = spec.trials()
    assert len(trials) == 18
    by_base = {b: [t for t in trials if t.config.base == b] for b in ("dm", "dc", "mtt")}
    assert all(len(group) == 6 for group in by_base.values())
    assert all(not t.config.zca and t.config.ipc == 10 for t in trials)
    assert {t.config.syn_steps for t in by_base["mtt"]} == {30}  # the mtt preset's value
    assert {t.config.iterations for t in by_base["dc"]} == {10000}  # the dc preset's value
    assert 0 < spec.resources.gpu < 1


def test_the_flagship_sweeps_run_mtt_as_published_with_a_lambda_zero_twin_per_cell():
    from mim4dd.presets import preset_values

    for name, cells in (("lambda_ablation", 1), ("main_table", 6)):
        trials = load_spec(ROOT / "sweeps" / f"{name}.yaml").trials()
        assert {t.config.base for t in trials} == {"mtt"}
        for trial in trials:  # the published settings, ZCA included, none overridden
            published = preset_values("mtt", trial.config.preset)
            assert {k: getattr(trial.config, k) for k in published} == published
        twins = {(t.config.preset, t.config.seed) for t in trials if t.config.lam == 0}
        assert len(twins) == cells * 5  # every cell and seed has its lam 0 twin
        assert all((t.config.preset, t.config.seed) in twins for t in trials)
    dm = load_spec(ROOT / "sweeps" / "lambda_dm_log.yaml").trials()
    assert {t.config.base for t in dm} == {"dm"}
    assert sorted({t.config.lam for t in dm}) == [0, 0.1, 1, 10, 100, 1000]
