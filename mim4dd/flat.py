"""A network's parameters as one flat vector, and calls of the network at any such vector.

Trajectory matching handles networks as points in parameter space: an expert's trajectory is a
list of vectors, a student step is `theta - lr * grad`, and the matching loss is a distance
between vectors. `FlatParams` keeps the architecture (a weightless skeleton) apart from the
weights, so the same vector can be an expert checkpoint read from disk or a student tensor that
carries the autograd graph of every unrolled step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call


class _BlockFeatures(nn.Module):
    """Calls `net.block_features` through `functional_call`, which only ever calls forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.block_features(x)


class FlatParams:
    def __init__(self, net: nn.Module):
        if any(True for _ in net.buffers()):
            raise ValueError("flat-parameter networks must not keep buffers (use no batch norm)")
        named = list(net.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)
        self.skeleton = copy.deepcopy(net).to("meta")  # the architecture without weights
        self._features = _BlockFeatures(self.skeleton)

    def flatten(self, net: nn.Module) -> torch.Tensor:
        """The network's current weights as one detached vector (in `named_parameters` order)."""
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflatten(self, flat: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        if flat.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} parameters, got {list(flat.shape)}")
        parts = flat.split(self.numels)
        return {
            prefix + name: part.view(shape)
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network whose weights are `flat`."""
        return functional_call(self.skeleton, self.unflatten(flat), (x,))

    def block_features(self, flat: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output map of the network whose weights are `flat`."""
        return functional_call(self._features, self.unflatten(flat, prefix="net."), (x,))


__all__ = ["FlatParams"]
