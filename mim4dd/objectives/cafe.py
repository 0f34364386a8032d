"""CAFE (Wang et al., CVPR 2022): align features layer by layer, and keep the set discriminative.

A network of the run's architecture is trained alongside the synthetic set. Per step, with
each class's siamese DSA transformation A_c, f_l the network's layer l and e its embedding:

    L_align = sum_l w_l sum_c || mean_{x in T_c} f_l(A_c(x)) - mean_{s in S_c} f_l(A_c(s)) ||^2
    L_disc  = sum_{x in T} CE(e(A(x)) . P^T, y_x),   P_c = mean_{s in S_c} e(A_c(s))
    L_CAFE  = L_align + beta * L_disc

The layers are every block's map before its pooling plus the (pooled, flattened) embedding.
The network's schedule is DC's, inherited from `GradientMatching`: fresh every `outer_loop`
image updates, trained `inner_loop` epochs on the synthetic set after each one, its weights and
optimiser part of the resumable state. Every choice and its source: docs/method.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim4dd.objectives.base import MatchOutput, StepBatch
from mim4dd.objectives.distribution import class_means
from mim4dd.objectives.gradient import GradientMatching

# The reference code's layer weights: 0.1 on the first blocks' maps, 1 on the last block's,
# and 2 on the embedding, which it aligns twice (as the pooled map and again flattened).
EARLY_BLOCK_WEIGHT = 0.1
LAST_BLOCK_WEIGHT = 1.0
EMBEDDING_WEIGHT = 2.0
BETA = 0.01  # weight of the discrimination loss (a sum over the real images), the reference's
# The reference ends a network's turn, and its training between updates, by accuracy watchers
# over windows of 10; these fixed counts are those windows (the fewest the reference runs).
OUTER_LOOP = 10
INNER_LOOP = 10
REAL_CHUNK = 256  # real images per no-grad forward, so no activation holds the whole batch


def layer_weights(depth: int) -> list[float]:
    """w_l for each block's pre-pooling map, then the embedding."""
    return [EARLY_BLOCK_WEIGHT] * (depth - 1) + [LAST_BLOCK_WEIGHT, EMBEDDING_WEIGHT]


def cafe_forward(net, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(aligned layers, block outputs): every block's map before its pooling then the flattened
    embedding (what CAFE aligns), and every block's output (the MIM term's taps)."""
    layers, outputs = [], []
    x = images
    for block in net.blocks:
        before_pool = block[:-1](x)  # conv -> norm -> ReLU
        x = block[-1](before_pool)
        layers.append(before_pool.flatten(1))
        outputs.append(x)
    layers.append(x.flatten(1))
    return layers, outputs


def cafe_loss(
    real_means: list[torch.Tensor], real_embed: torch.Tensor, real_labels: torch.Tensor,
    syn_layers: list[torch.Tensor], syn_labels: torch.Tensor, weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_align, L_disc) from the real side's per-class layer means and embeddings and the
    synthetic side's layers (the last one the embedding)."""
    num_classes = real_means[0].shape[0]
    syn_means = [class_means(f, syn_labels, num_classes) for f in syn_layers]
    align = sum(w * ((r - s) ** 2).sum() for w, r, s in zip(weights, real_means, syn_means,
                                                            strict=True))
    # The synthetic class centres in embedding space classify the real images (no temperature,
    # plain dot products, as in the reference).
    logits = real_embed @ syn_means[-1].T
    return align, F.cross_entropy(logits, real_labels, reduction="sum")


class CAFE(GradientMatching):
    def __init__(self, config, data, device):
        super().__init__(config, data, device)
        self.outer_loop = config.outer_loop or OUTER_LOOP
        self.inner_loop = INNER_LOOP if config.inner_loop is None else config.inner_loop
        self.weights = layer_weights(config.model.depth)

    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        net = self.network(batch)
        num_classes = self.data.info.num_classes
        aug = self.dsa.sample(num_classes, batch.generator, self.device)
        real = self.dsa.apply(batch.real, aug, batch.real_labels)
        syn = self.dsa.apply(batch.syn, aug, batch.syn_labels)

        real_means, real_embed, real_taps = self._real_side(net, real, batch.real_labels,
                                                            with_features)
        syn_layers, syn_outputs = cafe_forward(net, syn)
        align, disc = cafe_loss(real_means, real_embed, batch.real_labels, syn_layers,
                                batch.syn_labels, self.weights)
        base_loss = align + BETA * disc
        if not with_features:
            return MatchOutput(base_loss)
        return MatchOutput(base_loss, real_taps, self.taps(syn_outputs))

    def _real_side(self, net, real: torch.Tensor, labels: torch.Tensor, with_features: bool):
        """Per-class means of every aligned layer, the embeddings and (when asked) the MIM taps
        of the real batch, in chunks and without a graph: real images are never trained."""
        num_classes = self.data.info.num_classes
        sums, counts = None, torch.bincount(labels, minlength=num_classes).clamp_min(1)
        embeds, taps = [], []
        with torch.no_grad():
            for chunk, chunk_labels in zip(real.split(REAL_CHUNK), labels.split(REAL_CHUNK),
                                           strict=True):
                layers, outputs = cafe_forward(net, chunk)
                if sums is None:
                    sums = [f.new_zeros(num_classes, f.shape[1]) for f in layers]
                for total, f in zip(sums, layers, strict=True):
                    total.index_add_(0, chunk_labels, f)
                embeds.append(layers[-1])
                if with_features:
                    taps.append(self.taps(outputs))
        means = [total / counts.unsqueeze(1) for total in sums]
        real_taps = [torch.cat(parts) for parts in zip(*taps, strict=True)] if taps else None
        return means, torch.cat(embeds), real_taps
