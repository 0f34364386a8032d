"""The distillation loop: L = L_base + lambda * L_MIM, optimised over images and MIM heads.

Every step draws its randomness (real batch, DSA parameters, fresh network weights) from a
generator seeded by (seed, iteration) alone, so a run resumed from `state_dict()` continues
bit-for-bit on CPU without saving any RNG state.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from mim4dd.atomic import write_atomic
from mim4dd.bases import base_class
from mim4dd.config import Config
from mim4dd.data import RealData, load_for
from mim4dd.device import resolve_device
from mim4dd.memory import keep_freed_memory
from mim4dd.objectives.base import DivergenceError, StepBatch
from mim4dd.objectives.mim import MIMTerm
from mim4dd.synset import SyntheticSet

STATE_VERSION = 1
INIT_STREAM = 1  # the initial images draw from their own stream, apart from the steps
HEADS_STREAM = 2  # so do `mim_heads: per_step`'s heads, drawn anew every step
# The paper's λ needs no per-term gradients; knowing them apart (to log `mim_grad_ratio`)
# walks the synthetic side's graph twice, 1.7x the CPU time of a DM step at IPC 50, so that
# happens every this many steps (relative mode needs them every step).
GRAD_RATIO_EVERY = 10


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or infinite; the run stops instead of writing a broken set."""


class DistillCallback:
    """Receives progress from `Distiller.run`. Override what you need; all are no-ops."""

    def on_start(self, distiller: Distiller) -> None: ...

    def on_iteration(self, iteration: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, iteration: int, state: dict) -> None: ...


def step_seed(seed: int, iteration: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed from the run seed, the iteration and a stream tag."""
    entropy = [seed, stream, iteration]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class Distiller:
    def __init__(self, config: Config, data: RealData | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        keep_freed_memory()
        self.data = data or load_for(config)
        if config.zca != (self.data.zca is not None):
            raise ValueError(f"config zca={config.zca} but the data given is "
                             f"{'' if self.data.zca is not None else 'not '}ZCA-whitened")
        info = self.data.info
        self.objective = base_class(config.base)(config, self.data, self.device)
        self.train_images = self.data.train.images.to(self.device)
        self.train_labels = self.data.train.labels.to(self.device)

        self.syn_labels = torch.arange(info.num_classes, device=self.device).repeat_interleave(
            config.ipc
        )
        self.images = self._initial_images().to(self.device).requires_grad_(True)
        self.image_optimizer = torch.optim.SGD(
            [self.images], lr=config.lr_img, momentum=config.momentum_img
        )
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(
            self.image_optimizer, milestones=config.lr_milestones, gamma=config.lr_gamma
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.mim = MIMTerm(self.objective.feature_dims(), config.head_dim, config.tau)
            self.mim.to(self.device)
        self.head_optimizer = torch.optim.SGD(
            self.mim.parameters(), lr=config.lr_heads, momentum=config.momentum_img
        )
        self.iteration = 0

    def _initial_images(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, 0, stream=INIT_STREAM))
        if self.config.init == "noise":
            shape = (len(self.syn_labels), *self.data.image_shape)
            return torch.randn(shape, generator=generator)
        if problem := self.data.ipc_problem(self.config.ipc):
            raise ValueError(problem)
        images, _ = self.data.sample_per_class(self.config.ipc, generator)
        return images.clone()

    def batch(self, iteration: int) -> StepBatch:
        """The real batch and randomness of one step; a function of (seed, iteration) alone."""
        seed = step_seed(self.config.seed, iteration)
        generator = torch.Generator().manual_seed(seed)
        index = self.data.by_class.sample(self.config.batch_real, generator).to(self.device)
        return StepBatch(
            self.train_images[index], self.train_labels[index], self.images, self.syn_labels,
            generator, seed, iteration,
        )

    def terms(
        self, batch: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """L_base and L_MIM (None at lambda = 0) for one batch, with their parts (detached)
        for logging."""
        use_mim = self.config.lam > 0  # lambda = 0 never touches the heads: the base method
        out = self.objective.match(batch, with_features=use_mim)
        parts = {"loss_base": out.base_loss.detach()}
        if not use_mim:
            return out.base_loss, None, parts
        if self.config.mim_heads == "per_step":
            self.mim.redraw(step_seed(self.config.seed, batch.iteration, stream=HEADS_STREAM))
            self.mim.fit(out.syn_features, out.real_features, batch.syn_labels,
                         batch.real_labels, self.config.lr_heads, self.config.momentum_img)
        mim_loss, per_block = self.mim(
            out.syn_features, out.real_features, batch.syn_labels, batch.real_labels
        )
        parts["loss_mim"] = mim_loss.detach()
        for k, block_loss in zip(self.config.blocks, per_block, strict=True):
            parts[f"loss_mim_block{k + 1}"] = block_loss.detach()
        return out.base_loss, mim_loss, parts

    def loss(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The paper's L = L_base + lambda * L_MIM for one batch, with its parts (detached).
        (`step` weighs L_MIM the same way unless `lam_mode` is "relative".)"""
        base, mim, parts = self.terms(batch)
        loss = base if mim is None else base + self.config.lam * mim
        parts["loss"] = loss.detach()
        return loss, parts

    def _trained_tensors(self) -> list[torch.Tensor]:
        """The leaves the total loss trains; anything else in the graph (a network's weights,
        an unrolled student's start) gets no gradient computed at all."""
        return [self.images, *self._learned_heads(), *self.objective.parameters()]

    def _learned_heads(self) -> list[torch.Tensor]:
        """The heads the total loss trains: none at lambda = 0, and none unless `mim_heads` is
        "learned" (fixed heads never move; per-step ones were fitted in `terms`)."""
        learned = self.config.lam > 0 and self.config.mim_heads == "learned"
        return list(self.mim.parameters()) if learned else []

    def step(self) -> dict[str, float]:
        """One optimisation step over the synthetic images, the MIM heads and the objective's
        own parameters; then the objective's own update (`after_backward`)."""
        batch = self.batch(self.iteration)
        base, mim, parts = self.terms(batch)
        self.image_optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        trained = self._trained_tensors()
        for tensor in self.objective.parameters():
            tensor.grad = None
        if mim is None:
            base.backward(inputs=trained)
            parts["loss"] = parts["loss_base"]
        elif self.config.lam_mode == "relative" or self.iteration % GRAD_RATIO_EVERY == 0:
            self._backward_with_mim(base, mim, parts)
        else:
            loss = base + self.config.lam * mim
            loss.backward(inputs=trained)
            parts["loss"] = loss.detach()
        metrics, grads_finite = self._read_back(parts, trained)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"loss became {metrics['loss']} at iteration {self.iteration} (base "
                f"{metrics['loss_base']}, mim {metrics.get('loss_mim', 0.0)}); stopping before "
                "the synthetic set is corrupted. Lower lr_img or lam."
            )
        if not grads_finite:
            raise NonFiniteLossError(
                f"a gradient became NaN or infinite at iteration {self.iteration} (loss "
                f"{metrics['loss']}); stopping before the synthetic set is corrupted."
            )
        self.image_optimizer.step()
        if self._learned_heads():
            self.head_optimizer.step()
        self.objective.after_backward(batch)  # may raise DivergenceError (a bad step size)
        metrics |= self.objective.step_metrics()
        metrics["lr_img"] = self.image_optimizer.param_groups[0]["lr"]
        self.schedule.step()
        self.iteration += 1
        return metrics

    def _backward_with_mim(
        self, base: torch.Tensor, mim: torch.Tensor, parts: dict[str, torch.Tensor]
    ) -> None:
        """Gradients of L_base + w * L_MIM into the images, heads and the objective's own
        tensors, from one pass over each term, so that the two terms' image gradients are
        known apart: `mim_grad_ratio` = |w grad_x L_MIM| / |grad_x L_base| says whether the
        MIM term acts at all. w is lambda (the paper's Eq. 17) or, with lam_mode "relative"
        (our extension), lambda |grad_x L_base| / |grad_x L_MIM|, which makes that ratio
        lambda on any base."""
        heads, own = self._learned_heads(), self.objective.parameters()
        from_base = torch.autograd.grad(base, [self.images, *own], retain_graph=True,
                                        allow_unused=True)
        from_mim = torch.autograd.grad(mim, [self.images, *heads, *own], allow_unused=True)
        base_norm, mim_norm = from_base[0].norm(), from_mim[0].norm()
        weight = torch.tensor(self.config.lam, device=self.device)
        if self.config.lam_mode == "relative":
            weight = weight * base_norm / mim_norm.clamp_min(torch.finfo(mim_norm.dtype).tiny)
        parts["mim_weight"] = weight
        parts["mim_grad_ratio"] = weight * mim_norm / base_norm
        parts["loss"] = (base + weight * mim).detach()
        self.images.grad = from_base[0] + weight * from_mim[0]
        for head, grad in zip(heads, from_mim[1 : 1 + len(heads)], strict=True):
            head.grad = None if grad is None else weight * grad
        own_from_mim = from_mim[1 + len(heads) :]
        for tensor, g_base, g_mim in zip(own, from_base[1:], own_from_mim, strict=True):
            grads = [g for g in (g_base, None if g_mim is None else weight * g_mim) if g is not None]
            tensor.grad = sum(grads) if grads else None

    @staticmethod
    def _read_back(
        parts: dict[str, torch.Tensor], trained: list[torch.Tensor]
    ) -> tuple[dict[str, float], bool]:
        """The loss parts as floats and whether every gradient is finite, in one host sync
        (on a GPU each `.item()` would wait for the device separately)."""
        finite = torch.stack([torch.isfinite(t.grad).all() for t in trained if t.grad is not None])
        values = torch.cat([torch.stack([p.float() for p in parts.values()]),
                            finite.all().float()[None]])
        *numbers, all_finite = values.tolist()
        return dict(zip(parts, numbers, strict=True)), all_finite == 1.0

    def run(
        self, callback: DistillCallback | None = None, checkpoint_every: int = 0
    ) -> SyntheticSet:
        """Step until `config.iterations`, reporting to `callback`; returns the set."""
        callback = callback or DistillCallback()
        callback.on_start(self)
        while self.iteration < self.config.iterations:
            started = time.perf_counter()
            metrics = self.step()
            metrics["seconds_per_iteration"] = time.perf_counter() - started
            callback.on_iteration(self.iteration, metrics)
            if checkpoint_every and self.iteration % checkpoint_every == 0:
                callback.on_checkpoint(self.iteration, self.state_dict())
        return self.synthetic_set()

    def synthetic_set(self) -> SyntheticSet:
        info = self.data.info
        return SyntheticSet.create(
            self.images.detach(), self.syn_labels, dataset=info.name,
            class_names=self.data.class_names, mean=info.mean, std=info.std,
            config=self.config.model_dump(mode="json"),
            eval_protocol=self.config.eval.model_dump(mode="json"),
            lr=self.objective.learned_lr(),  # a learned step size travels with the set
            extra={"iterations_done": self.iteration},
            zca=self.data.zca,  # a whitened set carries its transform
        )

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: images, optimisers, heads, iteration."""
        return {
            "version": STATE_VERSION,
            "iteration": self.iteration,
            "config": self.config.model_dump(mode="json"),
            "images": self.images.detach().cpu().clone(),
            "image_optimizer": self.image_optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "mim": {k: v.cpu() for k, v in self.mim.state_dict().items()},
            "head_optimizer": self.head_optimizer.state_dict(),
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"distillation state version {state.get('version')} is not {STATE_VERSION}")
        saved = Config.model_validate(state["config"])
        # Where and how it runs, how long it goes on, how it is evaluated and where the (key-checked)
        # expert buffer lives may change on resume.
        free = {"device", "compile", "iterations", "eval", "expert_dir"}
        if saved.model_dump(exclude=free) != self.config.model_dump(exclude=free):
            raise ValueError("this state was saved by a run with a different config")
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.image_optimizer.load_state_dict(state["image_optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.mim.load_state_dict(state["mim"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.iteration = int(state["iteration"])

    def save_state(self, path: str | Path) -> None:
        save_state(self.state_dict(), path)

    def load_state(self, path: str | Path) -> None:
        self.load_state_dict(read_state(path))


def save_state(state: dict, path: str | Path) -> None:
    """A `state_dict()` to a file, atomically: a kill mid-write leaves the previous one."""
    write_atomic(Path(path), lambda tmp: torch.save(state, tmp))


def read_state(path: str | Path) -> dict:
    # weights_only: tensors and plain containers only; never runs code from the file.
    return torch.load(path, map_location="cpu", weights_only=True)


def distill(
    config: Config, data: RealData | None = None, callback: DistillCallback | None = None
) -> SyntheticSet:
    """Run one distillation from scratch and return its synthetic set."""
    return Distiller(config, data).run(callback)
