"""Freed activation memory is reused by the next step, not faulted in again (mim4dd/memory.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Allocate and free 256 MB step after step; print the fewest page faults of three steps once
# the heap is warm (torch's aligned allocations leave gaps that glibc fills over the first few
# steps). The fewest: the kernel may take memory back behind the process (this machine runs
# DAMON's proactive pageout); one full run in eight saw one step fault all its 65,536 pages.
SCRIPT = """
import json, resource, torch
from mim4dd.memory import keep_freed_memory
applied = keep_freed_memory()
def step():
    activations = torch.ones(64 * 2**20)  # 256 MB of float32
    del activations
for _ in range(10):
    step()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _second_step(malloc: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MIM4DD_MALLOC"}
    if malloc is not None:
        env["MIM4DD_MALLOC"] = malloc
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_freed_memory_is_reused_and_the_opt_out_restores_the_default():
    tuned = _second_step(None)
    default = _second_step("default")
    assert tuned["applied"] and not default["applied"]
    # 256 MB is 65,536 pages of 4 KiB: glibc's default maps them afresh (fewer faults with
    # transparent huge pages, still thousands); kept memory is touched without a fault.
    assert tuned["faults"] < 500
    assert default["faults"] > 10 * max(tuned["faults"], 100)
