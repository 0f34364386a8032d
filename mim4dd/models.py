"""The ConvNet family of the dataset-distillation protocol, with per-block feature taps.

ConvNet-3: 3 x [Conv3x3 (128 ch) -> norm -> ReLU -> AvgPool 2x2] -> Linear. Single-channel
28x28 inputs get padding 3 on the first conv (28 -> 32 -> 16 -> 8 -> 4), as the reference code
does, so MNIST-like and CIFAR-like nets share a shape after the first block.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: config imports the evaluation pool, which imports this
    from mim4dd.config import ModelConfig


def norm_layer(kind: str, channels: int) -> nn.Module:
    """'instance', 'batch' or 'none' normalisation of a conv layer's output."""
    if kind == "instance":  # instance norm with affine, written as GroupNorm(C, C) like the reference
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _pool(kind: str) -> nn.Module:
    return {"avg": nn.AvgPool2d(2, 2), "max": nn.MaxPool2d(2, 2), "none": nn.Identity()}[kind]


class ConvNet(nn.Module):
    def __init__(self, channels: int, image_size: int, num_classes: int, config: ModelConfig):
        super().__init__()
        self.config = config
        blocks = []
        size, in_ch = image_size, channels
        for depth in range(config.depth):
            padding = 3 if depth == 0 and image_size == 28 and channels == 1 else 1
            size += 2 * padding - 2
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, config.width, 3, padding=padding),
                    norm_layer(config.norm, config.width),
                    nn.ReLU(inplace=True),
                    _pool(config.pooling),
                )
            )
            if config.pooling != "none":
                size //= 2
            if size < 1:
                raise ValueError(f"depth {config.depth} is too deep for {image_size}x{image_size}")
            in_ch = config.width
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = config.width * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def block_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output map of every block, first to last."""
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-classifier embedding (what distribution matching compares)."""
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout our ConvNets run fastest in on `device`: channels-last on CPU, where oneDNN's
    convolutions, group norm and pooling measured up to 2x faster on it (benchmarks/
    bench_speed.py); unmeasured elsewhere, so the default layout there."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def build_model(
    channels: int, image_size: int, num_classes: int, config: ModelConfig, seed: int | None = None
) -> ConvNet:
    """A fresh ConvNet; with `seed`, its initial weights depend on the seed alone."""
    return seeded(seed, lambda: ConvNet(channels, image_size, num_classes, config))


def seeded(seed: int | None, make: Callable[[], nn.Module]) -> nn.Module:
    """`make()`, drawing its initial weights from `seed` alone (when given) without touching
    the caller's global random state."""
    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def block_shapes(channels: int, image_size: int, config: ModelConfig) -> list[tuple[int, int, int]]:
    """C x H x W of each block's output, without building weights on a device."""
    with torch.device("meta"):
        net = ConvNet(channels, image_size, 2, config)
        probe = torch.empty(1, channels, image_size, image_size)
        return [tuple(f.shape[1:]) for f in net.block_features(probe)]
