"""What a relaunch resumes from: the newest checkpoint of each trial's current config that any
earlier launch left, read only from folders no other user could have written."""

from __future__ import annotations

import json
import os

from orchestrator.tune_folder import TRIAL_FILE, resumable_checkpoints, unsafe_files


def write_checkpoint(trial, index, **info):
    folder = trial / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    (folder / TRIAL_FILE).write_text(json.dumps(info))
    return str(folder)


def test_files_others_could_have_written_are_found(tmp_path):
    folder = tmp_path / "sweep"
    trial = folder / "launch-1" / "lam=0_abc"
    write_checkpoint(trial, 1, key="lam=0", digest="d0", iteration=10)
    assert unsafe_files(folder) == []
    os.chmod(trial / "checkpoint_000001" / TRIAL_FILE, 0o666)
    (trial / "params.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    found = unsafe_files(folder)
    assert any("trial.json is writable by group or others" in f for f in found)
    assert any("params.pkl is a symbolic link" in f for f in found)


def test_checkpoints_left_are_found_newest_first_for_the_current_config_only(tmp_path):
    folder = tmp_path / "sweep"
    first, second = folder / "launch-1" / "lam=0_abc", folder / "launch-2" / "lam=0_abc"
    old = write_checkpoint(first, 2, key="lam=0", digest="d0", iteration=20)
    new = write_checkpoint(second, 0, key="lam=0", digest="d0", iteration=30)  # a later launch
    evaluating = write_checkpoint(second, 1, key="lam=0", digest="d0", iteration=30, networks=2)
    write_checkpoint(first, 5, key="lam=0", digest="older config", iteration=40)
    write_checkpoint(first, 6, key="lam=0", iteration=50)  # an older mim4dd's: no digest
    other = write_checkpoint(folder / "lam=1_def", 0, key="lam=1", digest="d1", iteration=10)
    (first / "notes").mkdir()  # not a checkpoint folder: not read
    (first / "notes" / TRIAL_FILE).write_text(json.dumps({"key": "lam=1", "digest": "d1",
                                                           "iteration": 90}))
    (first / "checkpoint_000007").mkdir()
    (first / "checkpoint_000007" / TRIAL_FILE).write_text('{"key": "lam=0", "dig')  # cut short

    digests = {"lam=0": "d0", "lam=1": "d1"}
    # "lam=1_def" directly under the sweep: the layout before launches had folders of their own
    assert resumable_checkpoints(folder, digests) == {"lam=0": [evaluating, new, old],
                                                      "lam=1": [other]}
    assert resumable_checkpoints(folder, {"lam=0": "d0"}) == {"lam=0": [evaluating, new, old]}
    assert resumable_checkpoints(tmp_path / "none", digests) == {}
    os.chmod(first, 0o777)  # another user could have written into it: nothing is read
    assert resumable_checkpoints(folder, digests) == {}
