"""The interface every matching objective (DM, DC/DSA, MTT) implements.

One Distiller step is: `match` (base loss, and the MIM term's features) -> backward of the total
loss into the images, the MIM heads and the objective's own `parameters()` -> image and head
updates -> `after_backward` (the objective steps its own optimiser, trains its network, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from mim4dd.augment import DSA
from mim4dd.config import Config
from mim4dd.data import RealData
from mim4dd.models import block_shapes
from mim4dd.objectives.mim import pool_to_grid


@dataclass
class StepBatch:
    """Everything one distillation step sees. Real images are grouped class by class."""

    real: torch.Tensor
    real_labels: torch.Tensor
    syn: torch.Tensor
    syn_labels: torch.Tensor
    generator: torch.Generator  # the step's own randomness: network init, DSA parameters
    seed: int  # the step's seed, for anything that needs an integer (fresh network weights)
    iteration: int = 0  # which step this is (objectives with schedules of their own need it)


class DivergenceError(FloatingPointError):
    """The optimisation left its sane range (a non-finite loss, a step size gone negative or
    exploding); the run stops with the reason instead of writing a broken set."""


@dataclass
class MatchOutput:
    """The base loss and, when the MIM term is on, both sides' per-block pooled features."""

    base_loss: torch.Tensor
    real_features: list[torch.Tensor] | None = None  # per block: N_real x (C * grid * grid)
    syn_features: list[torch.Tensor] | None = None  # per block: N_syn x (C * grid * grid)


class MatchingObjective(ABC):
    """A base distillation objective L_base. MIM4DD adds lambda * L_MIM on its features.

    Everything specific to a base lives on its class: the step (`match`, `after_backward`),
    its own trained tensors and state, its config checks, whether it reads expert buffers, and
    its MIM feature taps. Register a new one in `mim4dd/bases.py`.
    """

    needs_experts: ClassVar[bool] = False  # reads an expert-trajectory buffer (the sweep
    # service trains missing ones before any trial starts)

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Raise ValueError (one sentence naming the fields) for settings this base cannot run.
        Called by `Config` validation, so a sweep refuses them before anything launches."""
        del config

    def __init__(self, config: Config, data: RealData, device: torch.device):
        self.config = config
        self.data = data
        self.device = device
        self.dsa = DSA(config.dsa_strategy, drop_flip=data.info.is_digits)

    def feature_dims(self) -> list[int]:
        """Width of each MIM tap (`taps`): channels x grid x grid of every block read."""
        info, config = self.data.info, self.config
        shapes = block_shapes(info.channels, info.image_size, config.model)
        return [shapes[k][0] * config.mim_grid**2 for k in config.blocks]

    def taps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The MIM term's features from a network's per-block maps: the blocks it reads,
        each average-pooled to a grid x grid summary and flattened."""
        return [pool_to_grid(maps[k], self.config.mim_grid) for k in self.config.blocks]

    @abstractmethod
    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        """Base loss for this step; with_features asks for the MIM term's feature taps."""

    def parameters(self) -> list[torch.Tensor]:
        """Leaf tensors of the objective trained on the total loss (MTT's step size).

        The Distiller back-propagates into them and `after_backward` steps them.
        """
        return []

    def after_backward(self, batch: StepBatch) -> None:
        """Called once the images were updated: step own optimisers, train own networks.

        May raise DivergenceError. Randomness comes from `batch.generator` only.
        """
        del batch

    def learned_lr(self) -> torch.Tensor | None:
        """A step size learned with the images, saved with the set and used by evaluation."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Numbers of the objective's own to log after `after_backward`, as host values it read
        anyway (a read of a device tensor here would wait for the device once more)."""
        return {}

    # Objectives that carry state across steps (a network being trained, a learned step size)
    # override these so a resumed run continues exactly.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state
