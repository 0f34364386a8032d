"""The MIM4DD term: contrastive mutual information between synthetic and real features.

Per block k: feature maps are average-pooled to a grid x grid map, flattened, projected by a
learned linear head (one per block and side) and L2-normalised. Every (synthetic, real) pair is
scored by the critic h = e^{s/tau} / (e^{s/tau} + r), s = z_syn . z_real, with r the number of
negatives per positive; same label = positive, different label = negative. The NCE loss
L_k = -E_pos[log h] - r * E_neg[log(1 - h)] lower-bounds the mutual information, and
L_MIM = sum_k L_k. See docs/method.md for every choice made here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pool_to_grid(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """N x C x H x W -> N x (C * grid * grid): the small summary each head projects."""
    return F.adaptive_avg_pool2d(maps, grid).flatten(1)


def nce_loss(
    z_syn: torch.Tensor, z_real: torch.Tensor, syn_labels: torch.Tensor, real_labels: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """NCE over all cross pairs with the CRD critic. Inputs are L2-normalised embeddings."""
    positive = syn_labels.unsqueeze(1) == real_labels.unsqueeze(0)
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return z_syn.new_zeros(())  # no contrast to learn from (a single class, say)
    log_r = math.log(num_neg / num_pos)
    scores = z_syn @ z_real.T / tau
    # log h and log(1 - h) through logaddexp, which stays finite for any score.
    log_denominator = torch.logaddexp(scores, torch.full_like(scores, log_r))
    log_h = scores - log_denominator
    log_one_minus_h = log_r - log_denominator
    return -log_h[positive].mean() - math.exp(log_r) * log_one_minus_h[~positive].mean()


class MIMTerm(nn.Module):
    """Learned heads plus the summed per-block NCE loss."""

    def __init__(self, block_dims: list[int], head_dim: int = 128, tau: float = 0.1):
        super().__init__()
        self.tau = tau
        self.syn_heads = nn.ModuleList(nn.Linear(d, head_dim) for d in block_dims)
        self.real_heads = nn.ModuleList(nn.Linear(d, head_dim) for d in block_dims)

    def forward(
        self, syn_features: list[torch.Tensor], real_features: list[torch.Tensor],
        syn_labels: torch.Tensor, real_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Total L_MIM and the per-block terms (for logging)."""
        per_block = []
        for syn_head, real_head, f_syn, f_real in zip(
            self.syn_heads, self.real_heads, syn_features, real_features, strict=True
        ):
            z_syn = F.normalize(syn_head(f_syn), dim=1)
            z_real = F.normalize(real_head(f_real), dim=1)
            per_block.append(nce_loss(z_syn, z_real, syn_labels, real_labels, self.tau))
        return torch.stack(per_block).sum(), per_block
