"""The MIM4DD term: contrastive mutual information between synthetic and real features.

Per block k: feature maps are average-pooled to a grid x grid map, flattened, projected by a
learned linear head (one per block and side) and L2-normalised. Every (synthetic, real) pair is
scored by the critic h = e^{s/tau} / (e^{s/tau} + r), s = z_syn . z_real, with r the number of
negatives per positive; same label = positive, different label = negative. The NCE loss
L_k = -E_pos[log h] - r * E_neg[log(1 - h)] lower-bounds the mutual information, and
L_MIM = sum_k L_k. See docs/method.md for every choice made here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def pool_to_grid(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """N x C x H x W -> N x (C * grid * grid): the small summary each head projects."""
    return F.adaptive_avg_pool2d(maps, grid).flatten(1)


@dataclass(frozen=True)
class Pairs:
    """The (synthetic, real) pairs of a step: each positive's and each negative's weight in
    its mean, and r, negatives per positive. The same for every block, so built once a step.
    Everything stays a tensor on the features' device: no read-back to the host (which on a
    GPU would wait for the device), also not for the case without contrast."""

    positive_weight: torch.Tensor  # 1 / #positives on positive pairs, else 0
    negative_weight: torch.Tensor  # 1 / #negatives on negative pairs, else 0
    log_r: torch.Tensor  # 0-dim float64; 0 (a harmless stand-in) without contrast
    contrast: torch.Tensor  # 0-dim bool: both positives and negatives exist (not one class)

    @classmethod
    def of(cls, syn_labels: torch.Tensor, real_labels: torch.Tensor) -> Pairs:
        positive = (syn_labels.unsqueeze(1) == real_labels.unsqueeze(0)).float()
        num_pos = positive.sum(dtype=torch.int64)
        num_neg = positive.numel() - num_pos
        contrast = (num_pos > 0) & (num_neg > 0)
        # In float64, as math.log of the counts' ratio: the same number as a host computation.
        ratio = num_neg.double() / num_pos.clamp_min(1).double()
        log_r = torch.where(contrast, ratio.clamp_min(1e-300).log(), 0.0)
        return cls(positive / num_pos.clamp_min(1), (1 - positive) / num_neg.clamp_min(1),
                   log_r, contrast)


def nce_loss(
    z_syn: torch.Tensor, z_real: torch.Tensor, syn_labels: torch.Tensor, real_labels: torch.Tensor,
    tau: float, pairs: Pairs | None = None,
) -> torch.Tensor:
    """NCE over all cross pairs with the CRD critic. Inputs are L2-normalised embeddings;
    `pairs`, when given, is `Pairs.of(syn_labels, real_labels)` built once for every block.
    0 (with zero gradients) without contrast: a single class has nothing to tell apart."""
    pairs = pairs or Pairs.of(syn_labels, real_labels)
    scores = z_syn @ z_real.T / tau
    # log h and log(1 - h) through logaddexp, which stays finite for any score.
    log_denominator = torch.logaddexp(scores, pairs.log_r.to(scores.dtype).expand_as(scores))
    log_h = scores - log_denominator
    log_one_minus_h = pairs.log_r - log_denominator
    loss = (-(log_h * pairs.positive_weight).sum()
            - pairs.log_r.exp().to(scores.dtype) * (log_one_minus_h * pairs.negative_weight).sum())
    return torch.where(pairs.contrast, loss, 0.0)


# `mim_heads: per_step`: SGD steps fitting freshly drawn heads to one step's features, with the
# learned heads' optimiser settings. (Adam at the heads' lr overshot: L_MIM rose from 10.4 to
# 18 on the digits before it fell.) Each is a forward and backward of the linear heads alone,
# on the pooled features; not timed.
HEAD_FIT_STEPS = 20


class MIMTerm(nn.Module):
    """Learned heads plus the summed per-block NCE loss."""

    def __init__(self, block_dims: list[int], head_dim: int = 128, tau: float = 0.1):
        super().__init__()
        self.block_dims, self.head_dim, self.tau = list(block_dims), head_dim, tau
        self.syn_heads = nn.ModuleList(nn.Linear(d, head_dim) for d in block_dims)
        self.real_heads = nn.ModuleList(nn.Linear(d, head_dim) for d in block_dims)

    def forward(
        self, syn_features: list[torch.Tensor], real_features: list[torch.Tensor],
        syn_labels: torch.Tensor, real_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Total L_MIM and the per-block terms (for logging)."""
        per_block = []
        pairs = Pairs.of(syn_labels, real_labels)
        for syn_head, real_head, f_syn, f_real in zip(
            self.syn_heads, self.real_heads, syn_features, real_features, strict=True
        ):
            z_syn = F.normalize(syn_head(f_syn), dim=1)
            z_real = F.normalize(real_head(f_real), dim=1)
            per_block.append(nce_loss(z_syn, z_real, syn_labels, real_labels, self.tau, pairs))
        return torch.stack(per_block).sum(), per_block

    def redraw(self, seed: int) -> None:
        """New heads, initialised as a fresh `MIMTerm` from `seed` (on CPU, so the draw is the
        same on every device)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = MIMTerm(self.block_dims, self.head_dim, self.tau)
        self.load_state_dict(fresh.state_dict())

    def fit(
        self, syn_features: list[torch.Tensor], real_features: list[torch.Tensor],
        syn_labels: torch.Tensor, real_labels: torch.Tensor, lr: float, momentum: float,
        steps: int = HEAD_FIT_STEPS,
    ) -> None:
        """Minimise L_MIM over the heads alone, the features held fixed (`mim_heads: per_step`)."""
        syn = [f.detach() for f in syn_features]
        real = [f.detach() for f in real_features]
        optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                self(syn, real, syn_labels, real_labels)[0].backward()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
