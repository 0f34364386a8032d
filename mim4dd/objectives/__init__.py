"""Matching objectives, looked up by the name used in `Config.base`."""

from mim4dd.objectives.base import MatchingObjective, MatchOutput, StepBatch
from mim4dd.objectives.distribution import DistributionMatching
from mim4dd.objectives.mim import MIMTerm, nce_loss, pool_to_grid

BASES: dict[str, type[MatchingObjective]] = {"dm": DistributionMatching}

__all__ = [
    "BASES", "DistributionMatching", "MIMTerm", "MatchOutput", "MatchingObjective", "StepBatch",
    "nce_loss", "pool_to_grid",
]
