"""Matching objectives, looked up by the name used in `Config.base`."""

from mim4dd.objectives.base import DivergenceError, MatchingObjective, MatchOutput, StepBatch
from mim4dd.objectives.distribution import DistributionMatching
from mim4dd.objectives.gradient import GradientMatching, gradient_distance, loops_for_ipc
from mim4dd.objectives.mim import MIMTerm, nce_loss, pool_to_grid
from mim4dd.objectives.trajectory import StepSizeError, TrajectoryMatching, unroll

BASES: dict[str, type[MatchingObjective]] = {
    "dm": DistributionMatching,
    "dc": GradientMatching,
    "mtt": TrajectoryMatching,
}

__all__ = [
    "BASES", "DistributionMatching", "DivergenceError", "GradientMatching", "MIMTerm",
    "MatchOutput", "MatchingObjective", "StepBatch", "StepSizeError", "TrajectoryMatching",
    "gradient_distance", "loops_for_ipc", "nce_loss", "pool_to_grid", "unroll",
]
