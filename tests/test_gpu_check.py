"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: its tiny CPU rehearsal writes a
report of every part, and without one the real check stops at once, saying why."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ["step_times", "syncs", "evaluation", "peak_memory"]
# Skipped by the dry run, with a note: tests that skip without CUDA, and the parts needing Ray.
SKIPPED = ["cuda_tests", "service_overhead", "sweep_sharing"]


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module, run in this process (torch is imported already: ~3 s saved)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("gpu_check")
    monkeypatch.setenv(module.OFFLINE_ENV, "1")  # what main() sets; undone after the test
    threads = torch.get_num_threads()  # the dry run takes one thread
    yield module
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_dry_run_reports_every_part(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run-cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = report["parts"]
    assert sorted(parts) == sorted(RUN + SKIPPED)
    assert report["mode"] == "dry-run-cpu" and report["failed"] == []
    for name in RUN:
        assert parts[name]["status"] == "ok", parts[name]
    for name in SKIPPED:
        assert parts[name]["status"] == "skipped" and parts[name]["note"]
    bases = {(row["base"], row["lam"]) for row in parts["step_times"]["result"]["rows"]}
    assert bases == {(b, lam) for b in ("dm", "dc", "mtt", "cafe") for lam in (0.0, 0.8)}
    assert len(parts["syncs"]["result"]["rows"]) == 8
    assert parts["evaluation"]["result"]["rows"][0]["max_acc_diff"] < 0.25
    presets = {row["preset"] for row in parts["peak_memory"]["result"]["rows"]}
    assert len(presets) == 6  # every preset of sweeps/main_table.yaml
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert all(f"(`{name}`)" in markdown for name in parts)


def test_without_cuda_it_stops_at_once_saying_so(gpu_check, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # Run as a script it exits before importing Ray or MLflow (~2 s here, timed by hand).
    assert gpu_check.main(["--out", str(tmp_path / "report")]) == gpu_check.NO_CUDA_EXIT == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # nothing measured, nothing written


def test_it_reads_the_table_bench_service_overhead_prints(gpu_check, capsys):
    common = importlib.import_module("_common")
    common.print_table("step rate", ["path", "report every (s)", "ratio to engine"],
                       [["engine", "-", "1.00"], ["service", "1", "0.90"]])
    rows = gpu_check.parse_rich_table(capsys.readouterr().out)
    assert rows[1] == {"path": "service", "report every (s)": "1", "ratio to engine": "0.90"}
