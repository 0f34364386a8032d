"""Which Tune experiment folders a relaunch may restore (Tune unpickles them): whole, and
written by this user only."""

from __future__ import annotations

import json
import os

from orchestrator.tune_folder import (
    TRIAL_FILE, missing_checkpoints, restore_blockers, resumable_checkpoints, unsafe_files,
)


def make_experiment(tmp_path):
    folder = tmp_path / "sweep"
    trial = folder / "lam=0_abc"
    (trial / "checkpoint_000001").mkdir(parents=True)
    rows = [{"iteration": 10, "checkpoint_dir_name": "checkpoint_000000"},
            {"iteration": 15, "checkpoint_dir_name": None},
            {"iteration": 20, "checkpoint_dir_name": "checkpoint_000001"}]
    (trial / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"cut')
    (folder / "tuner.pkl").write_bytes(b"state")
    os.chmod(folder / "tuner.pkl", 0o644)
    return folder, trial


def test_a_whole_folder_of_ours_may_be_restored(tmp_path):
    folder, _ = make_experiment(tmp_path)
    assert restore_blockers(folder) == []


def test_a_missing_newest_checkpoint_blocks_restore(tmp_path):
    folder, trial = make_experiment(tmp_path)
    (trial / "checkpoint_000001").rmdir()
    assert missing_checkpoints(folder) == ["lam=0_abc/checkpoint_000001"]
    [reason] = restore_blockers(folder)
    assert "checkpoint lam=0_abc/checkpoint_000001 is gone" in reason


def test_a_checkpoint_only_the_experiment_state_names_is_found_missing(tmp_path):
    # A kill can leave the result rows unwritten while Tune's state already names the checkpoint.
    folder, trial = make_experiment(tmp_path)
    (trial / "result.json").write_text("")
    state = {"trial_data": [[json.dumps({"trial_dir_name": trial.name,
                                         "checkpoint": {"path": f"{trial}/checkpoint_000002"}}),
                             "{}"]]}
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    assert missing_checkpoints(folder) == ["lam=0_abc/checkpoint_000002"]
    (trial / "checkpoint_000002").mkdir()
    assert missing_checkpoints(folder) == []


def test_files_others_could_have_written_block_restore(tmp_path):
    folder, trial = make_experiment(tmp_path)
    os.chmod(folder / "tuner.pkl", 0o666)
    (trial / "params.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    found = unsafe_files(folder)
    assert any("tuner.pkl is writable by group or others" in f for f in found)
    assert any("params.pkl is a symbolic link" in f for f in found)
    assert all("another user could have written" in r for r in restore_blockers(folder))


def write_checkpoint(trial, index, **info):
    folder = trial / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    (folder / TRIAL_FILE).write_text(json.dumps(info))
    return str(folder)


def test_checkpoints_left_are_found_newest_first_for_the_current_config_only(tmp_path):
    folder, trial = make_experiment(tmp_path)
    old = write_checkpoint(trial, 2, key="lam=0", digest="d0", iteration=20)
    new = write_checkpoint(trial, 3, key="lam=0", digest="d0", iteration=30)
    evaluating = write_checkpoint(trial, 4, key="lam=0", digest="d0", iteration=30, networks=2)
    write_checkpoint(trial, 5, key="lam=0", digest="older config", iteration=40)
    write_checkpoint(trial, 6, key="lam=0", iteration=50)  # an older mim4dd's: no digest
    other = write_checkpoint(folder / "lam=1_def", 0, key="lam=1", digest="d1", iteration=10)
    (trial / "checkpoint_000007").mkdir()
    (trial / "checkpoint_000007" / TRIAL_FILE).write_text('{"key": "lam=0", "dig')  # cut short

    digests = {"lam=0": "d0", "lam=1": "d1"}
    assert resumable_checkpoints(folder, digests) == {"lam=0": [evaluating, new, old],
                                                      "lam=1": [other]}
    assert resumable_checkpoints(folder, {"lam=0": "d0"}) == {"lam=0": [evaluating, new, old]}
    assert resumable_checkpoints(tmp_path / "none", digests) == {}
    os.chmod(folder / "tuner.pkl", 0o666)  # another user could have written it: nothing
    assert resumable_checkpoints(folder, digests) == {}
