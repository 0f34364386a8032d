"""A fourth base, kept outside mim4dd, to prove that adding one is one file plus one line.

Toy matching: the squared distance between each class's mean real image and mean synthetic
image (no network, no augmentation), with the MIM taps read from a freshly seeded ConvNet.
Loaded through $MIM4DD_PLUGINS by the tests; the last line is its registration.
"""

from __future__ import annotations

import torch

from mim4dd.bases import register_base
from mim4dd.models import build_model
from mim4dd.objectives.base import MatchingObjective, MatchOutput, StepBatch

MAX_IPC = 50


class ToyMatching(MatchingObjective):
    @classmethod
    def check_config(cls, config) -> None:
        if config.ipc > MAX_IPC:
            raise ValueError(f"base toy takes ipc up to {MAX_IPC}, got {config.ipc}")

    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        classes = self.data.info.num_classes
        real = _class_means(batch.real, batch.real_labels, classes)
        syn = _class_means(batch.syn, batch.syn_labels, classes)
        base_loss = ((real - syn) ** 2).sum()
        if not with_features:
            return MatchOutput(base_loss)
        info = self.data.info
        net = build_model(info.channels, info.image_size, classes, self.config.model,
                          seed=batch.seed).to(self.device).requires_grad_(False)
        with torch.no_grad():
            real_features = self.taps(net.block_features(batch.real))
        return MatchOutput(base_loss, real_features, self.taps(net.block_features(batch.syn)))


def _class_means(images: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    flat = images.flatten(1)
    sums = flat.new_zeros(classes, flat.shape[1]).index_add(0, labels, flat)
    return sums / torch.bincount(labels, minlength=classes).clamp_min(1).unsqueeze(1)


register_base("toy", ToyMatching)
