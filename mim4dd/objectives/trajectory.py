"""Trajectory matching (MTT, Cazenavette et al. 2022).

Each iteration samples an expert i and a start epoch t < max_start_epoch, unrolls N = syn_steps
differentiable SGD steps of a student from the expert's parameters at t on the synthetic set,
with a learnable step size alpha,

    theta_0 = theta*_t,   theta_{n+1} = theta_n - alpha * grad_theta CE(f(A(x_n); theta_n), y_n),

and matches the end point to the expert's parameters M = expert_epochs later:

    L_MTT = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2.

The graph reaches the pixels and alpha. alpha lives here with its own optimiser (SGD, lr_lr,
momentum 0.5) and is saved with the synthetic set, since evaluation trains with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mim4dd.augment import DSA
from mim4dd.experts import ExpertBuffer, ExpertBufferError, expert_dir, expert_key
from mim4dd.flat import FlatParams
from mim4dd.models import build_model
from mim4dd.objectives.base import DivergenceError, MatchingObjective, MatchOutput, StepBatch
from mim4dd.objectives.distribution import REAL_CHUNK

LR_MOMENTUM = 0.5  # of the step size's optimiser, as in the reference


class StepSizeError(DivergenceError):
    """The learned step size went non-positive, non-finite or above `syn_lr_max`."""


def unroll(
    model: FlatParams, start: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
    lr: torch.Tensor, steps: int, batch_size: int | None, generator: torch.Generator,
    augment: DSA | None = None,
) -> torch.Tensor:
    """The student's parameters after `steps` SGD steps from `start`, differentiable in
    `images` and `lr`. Mini-batches cycle through fresh permutations of the images."""
    size = min(batch_size or len(labels), len(labels))
    chunks: list[torch.Tensor] = []
    with torch.enable_grad():  # the student's own gradients are needed even under no_grad
        theta = start.detach().requires_grad_(True)
        for _ in range(steps):
            if not chunks:
                chunks = list(torch.randperm(len(labels), generator=generator).split(size))
            index = chunks.pop(0).to(images.device)
            x = images[index]
            if augment is not None:
                x = augment(x, generator)
            loss = F.cross_entropy(model(theta, x), labels[index])
            # create_graph: the matching loss is differentiated through every step.
            (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
            theta = theta - lr * grad
    return theta


def normalised_distance(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """||student - target||^2 / ||start - target||^2."""
    return ((student - target) ** 2).sum() / ((start - target) ** 2).sum()


class TrajectoryMatching(MatchingObjective):
    needs_experts = True

    @classmethod
    def check_config(cls, config) -> None:
        last_target = config.max_start_epoch - 1 + config.expert_epochs
        if last_target > config.expert_train_epochs:
            raise ValueError(
                f"max_start_epoch ({config.max_start_epoch}) - 1 + expert_epochs "
                f"({config.expert_epochs}) = {last_target} exceeds expert_train_epochs "
                f"({config.expert_train_epochs}): targets past the trajectory's end"
            )
        if config.model.norm == "batch":
            raise ValueError("base mtt needs model.norm instance or none: an unrolled "
                             "functional student keeps no batch-norm running statistics")

    def __init__(self, config, data, device):
        super().__init__(config, data, device)
        info = data.info
        with torch.device("meta"):
            net = build_model(info.channels, info.image_size, info.num_classes, config.model)
        self.model = FlatParams(net)
        self.buffer = ExpertBuffer.open(
            expert_dir(config, data), expert_key(config, data), min_count=config.num_experts
        )
        if self.buffer.num_params != self.model.size:
            raise ExpertBufferError(f"the buffer's networks have {self.buffer.num_params} "
                                    f"parameters, this model {self.model.size}")
        self.syn_lr = torch.tensor(config.lr_teacher, device=device, requires_grad=True)
        self._lr_value = float(config.lr_teacher)  # the step size as last read, for logging
        self.lr_optimizer = torch.optim.SGD([self.syn_lr], lr=config.lr_lr, momentum=LR_MOMENTUM)

    def match(self, batch: StepBatch, with_features: bool) -> MatchOutput:
        config, generator = self.config, batch.generator
        # Host-side draws: tolist reads the CPU tensor without an op that could wait for a device.
        expert = torch.randint(config.num_experts, (1,), generator=generator).tolist()[0]
        t = torch.randint(config.max_start_epoch, (1,), generator=generator).tolist()[0]
        start, target = self.buffer.rows(expert, [t, t + config.expert_epochs]).to(self.device)
        student = unroll(self.model, start, batch.syn, batch.syn_labels, self.syn_lr,
                         config.syn_steps, config.batch_syn, generator, self.dsa)
        base_loss = normalised_distance(student, start, target)
        if not with_features:
            return MatchOutput(base_loss)

        # MIM: synthetic features from the student's end point; real ones by default from the
        # expert at t + M -- the two networks the matching loss pulls together
        # (docs/method.md, which also measures the alternatives of `mim_real_net`).
        real_net = {"target": target, "start": start, "student": student.detach()}
        aug = self.dsa.sample(self.data.info.num_classes, generator, self.device)
        real = self.dsa.apply(batch.real, aug, batch.real_labels)
        syn = self.dsa.apply(batch.syn, aug, batch.syn_labels)
        with torch.no_grad():
            parts = [self._features(real_net[config.mim_real_net], chunk)
                     for chunk in real.split(REAL_CHUNK)]
        real_features = [torch.cat(blocks) for blocks in zip(*parts, strict=True)]
        return MatchOutput(base_loss, real_features, self._features(student, syn))

    def _features(self, flat: torch.Tensor, images: torch.Tensor) -> list[torch.Tensor]:
        return self.taps(self.model.block_features(flat, images))

    def parameters(self) -> list[torch.Tensor]:
        return [self.syn_lr]

    def after_backward(self, batch: StepBatch) -> None:
        self.lr_optimizer.step()
        self.lr_optimizer.zero_grad(set_to_none=True)
        value = self._lr_value = float(self.syn_lr.detach())  # the step's one extra read-back
        if not (math.isfinite(value) and 0 < value <= self.config.syn_lr_max):
            raise StepSizeError(
                f"the learned step size became {value:.4g} at iteration {batch.iteration} "
                f"(allowed: (0, {self.config.syn_lr_max:g}], syn_lr_max); stopping before the "
                "set is corrupted. Lower lr_lr or lr_img."
            )

    def learned_lr(self) -> torch.Tensor:
        return self.syn_lr.detach().clone()

    def step_metrics(self) -> dict[str, float]:
        return {"syn_lr": self._lr_value}

    def state_dict(self) -> dict:
        return {"syn_lr": self.syn_lr.detach().cpu().clone(),
                "lr_optimizer": self.lr_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.lr_optimizer.load_state_dict(state["lr_optimizer"])
