"""The interface every matching objective (DM, and later DC/DSA and MTT) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mim4dd.augment import DSA
from mim4dd.config import Config
from mim4dd.data import RealData


@dataclass
class StepBatch:
    """Everything one distillation step sees. Real images are grouped class by class."""

    real: torch.Tensor
    real_labels: torch.Tensor
    syn: torch.Tensor
    syn_labels: torch.Tensor
    generator: torch.Generator  # the step's own randomness: network init, DSA parameters
    seed: int  # the step's seed, for anything that needs an integer (fresh network weights)


@dataclass
class MatchOutput:
    """The base loss and, when the MIM term is on, both sides' per-block pooled features."""

    base_loss: torch.Tensor
    real_features: list[torch.Tensor] | None = None  # per block: N_real x (C * grid * grid)
    syn_features: list[torch.Tensor] | None = None  # per block: N_syn x (C * grid * grid)


class MatchingObjective(ABC):
    """A base distillation objective L_base. MIM4DD adds lambda * L_MIM on its features."""

    def __init__(self, config: Config, data: RealData, device: torch.device):
        self.config = config
        self.data = data
        self.device = device
        self.dsa = DSA(config.dsa_strategy, drop_flip=data.info.is_digits)

    @abstractmethod
    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        """Base loss for this step; with_features asks for the MIM term's feature taps."""

    # Objectives that carry state across steps (a network being trained, an expert cursor)
    # override these so a resumed run continues exactly.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state
