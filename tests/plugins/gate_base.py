"""A test-only base: distribution matching that stops at one named iteration until the test
lets it go, so a fault test kills or signals a trial at exactly that point, not after a sleep.

A test copies this file into its own folder and writes the settings beside it
(`<copy>.json`: {"at": 25}); `tests/sweep_helpers.Gate` does both. The first time any trial
reaches that iteration it writes `<copy>.reached` and waits until `<copy>.release` exists; a
resumed trial passing the iteration again goes straight on. With {"each": true} every trial
stops there (writing `<copy>.reached-<pid>`), so a test knows they all run at once. Loaded
through $MIM4DD_PLUGINS (the sweep service hands it to every trial); the last line registers it
as base `gated`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mim4dd.bases import register_base
from mim4dd.objectives.base import MatchOutput, StepBatch
from mim4dd.objectives.distribution import DistributionMatching

HERE = Path(__file__)
SETTINGS = json.loads(HERE.with_suffix(".json").read_text())
AT, EACH = SETTINGS["at"], SETTINGS.get("each", False)
RELEASE = HERE.with_suffix(".release")
WAIT_S = 300  # never released: the trial fails instead of hanging the test run


class GatedMatching(DistributionMatching):
    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        reached = HERE.with_suffix(f".reached-{os.getpid()}" if EACH else ".reached")
        if batch.iteration == AT and not reached.exists():
            reached.write_text(json.dumps({"pid": os.getpid(), "iteration": AT}))
            deadline = time.monotonic() + WAIT_S
            while not RELEASE.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate at iteration {AT} was never released")
                time.sleep(0.02)
        return super().match(batch, with_features)


register_base("gated", GatedMatching)
