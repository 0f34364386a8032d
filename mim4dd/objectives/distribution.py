"""Distribution matching (DM, Zhao & Bilen 2023): match per-class mean embeddings of a freshly
initialised network, with the same DSA transformation on a class's real and synthetic images."""

from __future__ import annotations

import torch

from mim4dd.compiled import MaybeCompiled, block_features
from mim4dd.models import build_model, memory_format
from mim4dd.objectives.base import MatchingObjective, MatchOutput, StepBatch

# Real images go through the frozen network in chunks, so 100 classes x 256 images never hold
# all first-block activations at once. With freed memory kept (mim4dd/memory.py) the chunk size
# measured within noise from 32 to 2048 images; 256 bounds each activation to 256 images.
REAL_CHUNK = 256


class DistributionMatching(MatchingObjective):
    def __init__(self, config, data, device):
        super().__init__(config, data, device)
        # Only the real images' no-grad forward (most of the step's work) is compiled: the
        # synthetic side's graph is walked once per loss term (retain_graph), which compiled
        # backward graphs got wrong in our test (torch 2.14: image gradients unlike eager).
        self._real_features = MaybeCompiled(block_features, config.compile)

    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        info = self.data.info
        layout = memory_format(self.device)
        net = build_model(info.channels, info.image_size, info.num_classes, self.config.model,
                          seed=batch.seed).to(self.device, memory_format=layout)
        net.requires_grad_(False)  # a random probe, never trained: gradients go to images only
        params = self.dsa.sample(info.num_classes, batch.generator, self.device)
        real = self.dsa.apply(batch.real, params, batch.real_labels).contiguous(memory_format=layout)
        syn = self.dsa.apply(batch.syn, params, batch.syn_labels).contiguous(memory_format=layout)

        with torch.no_grad():
            real_out = [self._embed(self._real_features(net, chunk), with_features)
                        for chunk in real.split(REAL_CHUNK)]
        real_embed = torch.cat([emb for emb, _ in real_out])
        syn_embed, syn_features = self._embed(net.block_features(syn), with_features)

        real_means = class_means(real_embed, batch.real_labels, info.num_classes)
        syn_means = class_means(syn_embed, batch.syn_labels, info.num_classes)
        base_loss = ((real_means - syn_means) ** 2).sum()
        if not with_features:
            return MatchOutput(base_loss)
        real_features = [torch.cat(parts) for parts in zip(*(f for _, f in real_out), strict=True)]
        return MatchOutput(base_loss, real_features, syn_features)

    def _embed(self, maps: list[torch.Tensor], with_features: bool):
        if not with_features:
            return maps[-1].flatten(1), []
        return maps[-1].flatten(1), self.taps(maps)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean rows of `embeddings` (num_classes x D; zero for an absent class)."""
    sums = embeddings.new_zeros(num_classes, embeddings.shape[1]).index_add(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)
    return sums / counts
