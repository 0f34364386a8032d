"""Evaluation: train N fresh, seeded ConvNets on a synthetic set; test on the real test split.

The N networks can train together: their parameters are stacked and one `torch.func.vmap`
call runs all of them on their own batches, which keeps a GPU busy with small synthetic
batches. On CPU each convolution already fills the cores and vmap measured slower, so by
default networks train together on CUDA only (`EvalConfig.parallel`). Sequential evaluation
trains groups of one network, each a plain module (no vmap); a test checks that both paths
reach the same accuracies (benchmarks/bench_evaluate.py measures the ratio).
"""

from __future__ import annotations

import copy
import re
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

from mim4dd.augment import DSA
from mim4dd.config import EvalConfig, ModelConfig
from mim4dd.data import RealData, Split
from mim4dd.memory import keep_freed_memory
from mim4dd.models import build_model

TEST_BATCH = 1024

# Metric names of an evaluation, the one place they are spelled: logged by the sweep service,
# read back by its status, report and aggregation.
EVAL_PREFIX = "eval/"
TEST_ACC_MEAN = f"{EVAL_PREFIX}test_acc_mean"
TEST_ACC_STD = f"{EVAL_PREFIX}test_acc_std"
VAL_ACC_MEAN = f"{EVAL_PREFIX}val_acc_mean"
NET_TEST_ACC = re.compile(rf"^{EVAL_PREFIX}test_acc_net(\d+)$")  # group 1: the network


def net_metric(split: str, index: int) -> str:
    """Name of network `index`'s accuracy on `split` ("test" or "val")."""
    return f"{EVAL_PREFIX}{split}_acc_net{index}"


@dataclass
class EvalResult:
    test_accuracies: list[float]  # one per network, in [0, 1]
    val_accuracies: list[float]
    lr: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_accuracies)

    @property
    def std(self) -> float:
        # Population std over the networks, as the DD literature reports it.
        return statistics.pstdev(self.test_accuracies)

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val_accuracies) if self.val_accuracies else float("nan")

    def metrics(self) -> dict[str, float]:
        """Per-network and summary accuracies, by their metric names."""
        found = {net_metric("test", i): a for i, a in enumerate(self.test_accuracies)}
        found |= {net_metric("val", i): a for i, a in enumerate(self.val_accuracies)}
        found |= {TEST_ACC_MEAN: self.mean, TEST_ACC_STD: self.std}
        if self.val_accuracies:
            found[VAL_ACC_MEAN] = self.val_mean
        return found

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std, "val_mean": self.val_mean}

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % over {len(self.test_accuracies)} nets"


class Evaluator:
    """Built once from config; `evaluate` trains `num_nets` networks on the given set."""

    def __init__(
        self, config: EvalConfig, model: ModelConfig, data: RealData, dsa_strategy: str,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.model_config = model
        self.data = data
        self.device = torch.device(device)
        keep_freed_memory()
        self.dsa = DSA(dsa_strategy if config.dsa else "none", drop_flip=data.info.is_digits)

    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, lr: float | torch.Tensor | None = None,
        parallel: bool | None = None,
    ) -> EvalResult:
        """Train every network from its own seed; `lr` (a learned step size) overrides config."""
        lr = float(lr) if lr is not None else self.config.lr
        if parallel is None:
            parallel = self.config.parallel
        if parallel is None:
            parallel = self.device.type == "cuda"
        seeds = [self.config.seed + i for i in range(self.config.num_nets)]
        groups = [seeds] if parallel else [[s] for s in seeds]
        test, val = [], []
        for group in groups:
            ensemble = self._train(group, images.detach().to(self.device), labels.to(self.device), lr)
            test += self._accuracy(ensemble, self.data.test)
            val += self._accuracy(ensemble, self.data.val) if len(self.data.val) else []
        return EvalResult(test, val, lr)

    def _train(self, seeds: list[int], images: torch.Tensor, labels: torch.Tensor, lr: float):
        info, config = self.data.info, self.config
        nets = [
            build_model(info.channels, info.image_size, info.num_classes, self.model_config, s)
            for s in seeds
        ]
        ensemble = _Ensemble(nets, self.device)
        optimizer = torch.optim.SGD(
            ensemble.params, lr=lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        decay_at = int(config.epochs * config.lr_decay_epoch_fraction)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [decay_at], gamma=0.1)
        # Each network shuffles and augments with its own generator, as if trained alone.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        n, batch = len(labels), min(config.batch_size, len(labels))
        for _epoch in range(config.epochs):
            orders = torch.stack([torch.randperm(n, generator=g) for g in generators])
            for start in range(0, n, batch):
                index = orders[:, start : start + batch].to(self.device)  # nets x batch
                x = torch.stack(
                    [self.dsa(images[idx], g) for idx, g in zip(index, generators, strict=True)]
                )
                logits = ensemble(x)
                # Summing the per-network losses keeps each network's gradient its own.
                loss = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten(),
                                       reduction="none").view(len(seeds), -1).mean(1).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()
        return ensemble

    @torch.no_grad()
    def _accuracy(self, ensemble: _Ensemble, split: Split) -> list[float]:
        correct = torch.zeros(ensemble.size, dtype=torch.long, device=self.device)
        batches = zip(split.images.split(TEST_BATCH), split.labels.split(TEST_BATCH), strict=True)
        for images, labels in batches:
            logits = ensemble.shared(images.to(self.device))
            correct += (logits.argmax(-1) == labels.to(self.device)).sum(1)
        return [count / len(split) for count in correct.tolist()]  # exact fractions


class _Ensemble:
    """N networks of one architecture trained side by side; each call takes one batch per net.

    Several networks are stacked and called through vmap. A single network stays a plain
    module: vmap around one network measured 1.2x slower per training step on CPU (its
    convolution backward takes a generic path), so groups of one never pay for it.
    """

    def __init__(self, nets: list[torch.nn.Module], device: torch.device):
        for net in nets:
            # vmap cannot update running statistics in place; batch-norm nets use batch stats
            # (in both paths, so that they compute the same thing).
            replace_all_batch_norm_modules_(net)
        self.size = len(nets)
        if self.size == 1:
            self.net = nets[0].to(device)
            self.params = list(self.net.parameters())
            return
        params, self.buffers = stack_module_state([net.to(device) for net in nets])
        stacked = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.stacked = stacked
        self.params = list(stacked.values())
        self.skeleton = copy.deepcopy(nets[0]).to("meta")

    def _call(self, params, buffers, x):
        return functional_call(self.skeleton, (params, buffers), (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: nets x batch x C x H x W, one batch per network."""
        if self.size == 1:
            return self.net(x[0]).unsqueeze(0)
        return vmap(self._call)(self.stacked, self.buffers, x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """One batch seen by every network: nets x batch x classes.

        A loop, not vmap: broadcasting one input through vmap measured ~1.7x slower on CPU.
        """
        if self.size == 1:
            return self.net(x).unsqueeze(0)
        return torch.stack([
            self._call({k: v[i] for k, v in self.stacked.items()},
                       {k: v[i] for k, v in self.buffers.items()}, x)
            for i in range(self.size)
        ])
