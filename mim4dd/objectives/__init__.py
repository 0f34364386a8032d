"""Matching objectives, looked up by the name used in `Config.base` (registered in `mim4dd.bases`)."""

from mim4dd.bases import base_class, base_names, register_base
from mim4dd.objectives.base import DivergenceError, MatchingObjective, MatchOutput, StepBatch
from mim4dd.objectives.cafe import CAFE
from mim4dd.objectives.distribution import DistributionMatching
from mim4dd.objectives.gradient import GradientMatching, gradient_distance, loops_for_ipc
from mim4dd.objectives.mim import MIMTerm, nce_loss, pool_to_grid
from mim4dd.objectives.trajectory import StepSizeError, TrajectoryMatching, unroll

__all__ = [
    "CAFE", "DistributionMatching", "DivergenceError", "GradientMatching", "MIMTerm",
    "MatchOutput", "MatchingObjective", "StepBatch", "StepSizeError", "TrajectoryMatching",
    "base_class", "base_names", "gradient_distance", "loops_for_ipc", "nce_loss", "pool_to_grid",
    "register_base", "unroll",
]
