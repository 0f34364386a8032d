"""Gradient matching: DC (Zhao et al. 2021), and DSA (Zhao & Bilen 2021) when augmenting.

Per class c, the distance between the network's parameter gradients on a real batch and on the
class's synthetic images, both under the class's siamese DSA transformation A_c:

    L_GM = sum_c D( grad_theta CE(net(A_c(T_c))), grad_theta CE(net(A_c(S_c))) )

One Distiller iteration is one image update. The network is freshly initialised every
`outer_loop` iterations and, after each matching step but the last before a re-initialisation,
trained `inner_loop` epochs on the (detached, augmented) synthetic set: the reference's outer
and inner loops, with the outer loop unrolled into Distiller iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim4dd.models import build_model
from mim4dd.objectives.base import MatchingObjective, MatchOutput, StepBatch

EPS = 1e-6  # keeps the cosine finite for an all-zero gradient row, as in the reference
# (outer_loop, inner_loop) of the reference implementation at the IPCs it supports.
REFERENCE_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def loops_for_ipc(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for any IPC.

    outer_loop = IPC, as in the reference. inner_loop is the reference's value where it has
    one, linear between those, and 500 / IPC past 50 (the reference's own trend from 10 on).
    """
    if ipc < 1:
        raise ValueError(f"ipc must be positive, got {ipc}")
    if ipc >= 50:
        return ipc, max(1, int(500 / ipc + 0.5))
    anchors = sorted((k, inner) for k, (_, inner) in REFERENCE_LOOPS.items())
    for (lo, lo_inner), (hi, hi_inner) in zip(anchors, anchors[1:]):
        if lo <= ipc <= hi:
            inner = lo_inner + (hi_inner - lo_inner) * (ipc - lo) / (hi - lo)
            return ipc, int(inner + 0.5)
    raise AssertionError("unreachable: the anchors cover 1..50")


def layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor) -> torch.Tensor:
    """The reference ('ours') distance for one parameter: sum over output rows of 1 - cos.

    Each output unit's incoming weights form a row (a conv filter is flattened); biases and
    normalisation scales (1-D) are not matched.
    """
    if g_syn.dim() == 1:
        return g_syn.new_zeros(())
    s, r = g_syn.flatten(1), g_real.flatten(1)
    return (1 - (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + EPS)).sum()


def gradient_distance(
    g_syn: list[torch.Tensor], g_real: list[torch.Tensor], metric: str = "ours"
) -> torch.Tensor:
    """D between two lists of per-parameter gradients: 'ours', 'mse' or 'cos'."""
    if metric == "ours":
        return torch.stack([layer_distance(s, r) for s, r in zip(g_syn, g_real, strict=True)]).sum()
    s = torch.cat([g.reshape(-1) for g in g_syn])
    r = torch.cat([g.reshape(-1) for g in g_real])
    if metric == "mse":
        return ((s - r) ** 2).sum()
    if metric == "cos":
        return 1 - (s * r).sum() / (s.norm() * r.norm() + EPS)
    raise ValueError(f"unknown dis_metric {metric!r}; allowed: ours, mse, cos")


class GradientMatching(MatchingObjective):
    def __init__(self, config, data, device):
        super().__init__(config, data, device)
        outer, inner = loops_for_ipc(config.ipc)
        self.outer_loop = config.outer_loop or outer
        self.inner_loop = inner if config.inner_loop is None else config.inner_loop
        self.net = None  # the network being trained; built at the first iteration
        self.optimizer = None

    def _new_network(self, seed: int) -> None:
        info = self.data.info
        self.net = build_model(info.channels, info.image_size, info.num_classes,
                               self.config.model, seed=seed).to(self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=self.config.lr_net)

    def network(self, batch: StepBatch):
        """The step's network: a fresh one (seeded by the step) at each outer-loop start."""
        if self.net is None or batch.iteration % self.outer_loop == 0:
            self._new_network(batch.seed)
        return self.net

    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        net = self.network(batch)
        params = list(net.parameters())
        num_classes = self.data.info.num_classes
        aug = self.dsa.sample(num_classes, batch.generator, self.device)
        real = self.dsa.apply(batch.real, aug, batch.real_labels)
        syn = self.dsa.apply(batch.syn, aug, batch.syn_labels)

        distances, real_features, syn_features = [], [], []
        # Both sides come grouped class by class, equally many per class (StepBatch): a class
        # is a slice, not a boolean mask (which would wait for the device once per class).
        per_class = zip(real.chunk(num_classes), batch.real_labels.chunk(num_classes),
                        syn.chunk(num_classes), batch.syn_labels.chunk(num_classes), strict=True)
        for real_c, real_labels_c, syn_c, syn_labels_c in per_class:
            real_maps, real_logits = self._forward(net, real_c)
            g_real = torch.autograd.grad(F.cross_entropy(real_logits, real_labels_c), params)
            syn_maps, syn_logits = self._forward(net, syn_c)
            # create_graph: the distance is differentiated again, into the synthetic pixels.
            g_syn = torch.autograd.grad(
                F.cross_entropy(syn_logits, syn_labels_c), params, create_graph=True
            )
            distances.append(gradient_distance(g_syn, [g.detach() for g in g_real],
                                               self.config.dis_metric))
            if with_features:
                real_features.append(self.taps([m.detach() for m in real_maps]))
                syn_features.append(self.taps(syn_maps))
        base_loss = torch.stack(distances).sum()
        if not with_features:
            return MatchOutput(base_loss)
        # Per block, classes back in order: the rows line up with batch.*_labels (class-major).
        return MatchOutput(
            base_loss,
            [torch.cat(parts) for parts in zip(*real_features, strict=True)],
            [torch.cat(parts) for parts in zip(*syn_features, strict=True)],
        )

    @staticmethod
    def _forward(net, images: torch.Tensor):
        maps = net.block_features(images)
        return maps, net.classifier(maps[-1].flatten(1))

    def after_backward(self, batch: StepBatch) -> None:
        """Train the network on the updated synthetic set (the reference's inner loop)."""
        if self.inner_loop == 0 or (batch.iteration + 1) % self.outer_loop == 0:
            return  # the next iteration starts a fresh network: training this one is wasted
        images = batch.syn.detach()  # the image optimiser updated this very tensor in place
        labels = batch.syn_labels
        size = min(self.config.batch_train, len(labels))
        for _epoch in range(self.inner_loop):
            order = torch.randperm(len(labels), generator=batch.generator).to(self.device)
            for index in order.split(size):
                x = self.dsa(images[index], batch.generator)
                loss = F.cross_entropy(self.net(x), labels[index])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

    def state_dict(self) -> dict:
        if self.net is None:
            return {"net": None, "optimizer": None}
        return {
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("net") is None:
            self.net = self.optimizer = None
            return
        self._new_network(seed=0)  # the weights are overwritten next
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
